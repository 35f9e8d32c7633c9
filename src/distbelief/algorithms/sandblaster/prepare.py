"""Sandblaster's part of ``train()``'s checks: its arguments to a ``SandblasterConfig`` (no
evaluation during training), and the checks that need the model and the data (in-memory data,
layers that can be split into the partitions asked for, the default checkpoint period of one
epoch, a checkpoint this run can carry on from)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ...core.blocks import stage_plans
from ...core.partition import layer_sizes, resolve_split_points, split_layers
from ...data.formats import FileData
from ...data.inputs import TensorRows
from ...errors import ConfigError
from ...storage.checkpoint import Checkpoint, load
from .config import SandblasterConfig
from .driver import prepare_resume

OPTIONAL = ("steps", "history", "portions")
"""Sandblaster's own ``train()`` arguments: None there means the config's default."""

TAKES = ("eval_every",)
"""``train()`` arguments of Downpour's that Sandblaster refuses with a message of its own."""


def configure(settings: dict[str, Any]) -> tuple[SandblasterConfig, None]:
    """``train()``'s settings as a checked ``SandblasterConfig``; a resumed run without a
    seed takes the checkpoint's (the batches' order comes from it)."""
    if settings["eval_every"]:
        raise ConfigError("eval_every: Sandblaster evaluates at the end only")
    stages = settings["stages"]
    config = SandblasterConfig(
        **{k: settings[k] for k in OPTIONAL if settings[k] is not None},
        batch_size=settings["batch_size"],
        stages=tuple(stages) if isinstance(stages, (list, tuple)) else stages,
        partitions=settings["partitions"],
        replicas=settings["replicas"],
        shards=settings["shards"],
        seed=settings["seed"],
        runtime=settings["runtime"],
        runtime_options=dict(settings["runtime_options"] or {}),
        timeout_s=settings["timeout_s"],
        checkpoint_dir=settings["checkpoint_dir"],
        checkpoint_every=settings["checkpoint_every"] or 0,
        resume=settings["resume"],
    )
    if config.resume is not None and settings["seed"] is None:
        config = replace(config, seed=load(config.resume).manifest["config"].get("seed"))
    return config, None


def memory(config: SandblasterConfig) -> tuple[int, str]:
    """The shards' vectors: x, g, d, w, ... and the history's pairs."""
    return 2 * config.history + 8, "L-BFGS's vectors"


def check(
    config: SandblasterConfig,
    settings: dict[str, Any],
    layers: list[nn.Module],
    rows: TensorRows | FileData,
    dtype: torch.dtype,
) -> SandblasterConfig:
    """In-memory data only; with partitions, every stage's layers can be cut into that many
    blocks (a ``ConfigError`` naming the layer, before any actor starts); the checkpoint
    period defaults to an epoch."""
    if not isinstance(rows, TensorRows):
        raise ConfigError("train_data: Sandblaster takes in-memory data, not a file")
    if config.partitions > 1:
        groups = split_layers(layers, resolve_split_points(layer_sizes(layers), config.stages))
        stage_plans(groups, config.partitions, tuple(rows.probe()[0].shape[1:]))
    if settings["checkpoint_every"] is None and config.checkpoint_dir is not None:
        # every epoch by default, as Downpour: a step is an epoch with the whole batch
        each = max(1, len(rows) // (config.batch_size or len(rows)))
        config = replace(config, checkpoint_every=each)
    return config


def resume(
    config: SandblasterConfig,
    stage_layers: list[list[nn.Module]],
    train_examples: int,
    ckpt: Checkpoint | None,
) -> Checkpoint:
    """The checkpoint to carry on from, checked against this run (``NothingToTrain`` when it
    has taken every step asked for)."""
    layers = [layer for group in stage_layers for layer in group]
    return prepare_resume(config, layers, train_examples)
