"""Downpour's part of ``train()``'s checks: its arguments to a ``DownpourConfig``, and the
checks that need the model and the data (a rate the dtype holds, no BatchNorm mini-batch of
one, the default checkpoint period of one epoch, a checkpoint this run can carry on from)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ...core.partition import layer_sizes, resolve_split_points, split_layers
from ...data.formats import FileData
from ...data.inputs import TensorRows, replica_ranges
from ...errors import ConfigError, NothingToTrain
from ...storage.checkpoint import Checkpoint, load, nothing_left
from .config import DownpourConfig
from .driver import prepare_resume, stage_plans

REQUIRED = {"lr": 0.05, "batch_size": 32, "epochs": 5}
"""The settings Downpour has no default for, with the example values its refusal gives."""

OPTIONAL = ("lr", "epochs", "optimizer", "n_fetch", "n_push", "warmstart_steps", "local_lr")
"""Downpour's own ``train()`` arguments: None there means the config's default."""

STATE_COPIES = {"sgd": 0, "momentum": 1, "adagrad": 1, "adam": 2}
"""Parameter-sized tensors of optimizer state per parameter, by update rule."""


def configure(settings: dict[str, Any]) -> tuple[DownpourConfig, Checkpoint | None]:
    """``train()``'s settings as a checked ``DownpourConfig``; a resumed run without a seed
    takes the checkpoint's (returned too, loaded)."""
    seed, resume, ckpt = settings["seed"], settings["resume"], None
    if resume is not None and seed is None:
        # The data order is a function of the seed: it comes from the checkpoint.
        if not isinstance(resume, (str, os.PathLike)):
            raise ConfigError(f"resume: expected a directory path, got {resume!r}")
        ckpt = load(resume)
        seed = ckpt.manifest["config"].get("seed")
    stages = settings["stages"]
    config = DownpourConfig(
        **{k: settings[k] for k in OPTIONAL if settings[k] is not None},
        batch_size=settings["batch_size"],
        stages=tuple(stages) if isinstance(stages, (list, tuple)) else stages,
        pipeline_depth=settings["pipeline_depth"],
        partitions=settings["partitions"],
        replicas=settings["replicas"],
        shards=settings["shards"],
        runtime=settings["runtime"],
        seed=seed,
        runtime_options=dict(settings["runtime_options"] or {}),
        eval_every=settings["eval_every"],
        timeout_s=settings["timeout_s"],
        checkpoint_dir=settings["checkpoint_dir"],
        checkpoint_every=settings["checkpoint_every"] or 0,
        resume=resume,
    )
    return config, ckpt


def memory(config: DownpourConfig) -> tuple[int, str]:
    """The update rule's state: parameter-sized tensors per parameter, and its name; with
    several mini-batches in flight, also the versions each replica's stages stash."""
    state, what = STATE_COPIES.get(config.optimizer, 2), f"{config.optimizer}'s state"
    if config.pipeline_depth > 1:  # up to depth versions per stage, one of them its own copy
        state += config.replicas * (config.pipeline_depth - 1)
        what += f" and {config.pipeline_depth} stashed versions per replica"
    return state, what


def check(
    config: DownpourConfig,
    settings: dict[str, Any],
    layers: list[nn.Module],
    rows: TensorRows | FileData,
    dtype: torch.dtype,
) -> DownpourConfig:
    """Downpour's checks of the model and the data; the checkpoint period defaults to an
    epoch."""
    check_lr(config, dtype)
    check_batches(layers, len(rows), config)
    if config.partitions > 1:  # a layer that cannot be split: refused before anything runs
        groups = split_layers(layers, resolve_split_points(layer_sizes(layers), config.stages))
        stage_plans(groups, config.partitions, tuple(rows.probe()[0].shape[1:]))
    if settings["checkpoint_every"] is None and config.checkpoint_dir is not None:
        config = replace(config, checkpoint_every=epoch_steps(len(rows), config))
    return config


def resume(
    config: DownpourConfig,
    stage_layers: list[list[nn.Module]],
    train_examples: int,
    ckpt: Checkpoint | None,
) -> Checkpoint:
    """The checkpoint to carry on from, checked against this run; ``NothingToTrain`` when it
    has every epoch asked for (before anything is written: the checkpoint stays as it is)."""
    ckpt = prepare_resume(config, stage_layers, train_examples, ckpt)
    left = nothing_left(ckpt, config.epochs, train_examples)
    if left is not None:
        raise NothingToTrain(f"epochs: {left}; give more epochs to train on")
    return ckpt


def check_lr(config: DownpourConfig, dtype: torch.dtype) -> None:
    """A rate the model's dtype cannot hold would turn every update into inf inside a shard."""
    limit = torch.finfo(dtype).max
    for name in ("lr", "local_lr"):
        value = getattr(config, name)
        if value > limit:
            raise ConfigError(
                f"{name}: {value:g} overflows the model's {str(dtype).removeprefix('torch.')} "
                f"(largest {limit:g})"
            )


def check_batches(layers: list[nn.Module], examples: int, config: DownpourConfig) -> None:
    """BatchNorm in training mode cannot normalise a mini-batch of one example: refuse a run
    whose epochs would end with one, instead of failing in its last step."""
    modules = [m for layer in layers for m in layer.modules()]
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
        return
    for r, (lo, hi) in enumerate(replica_ranges(examples, config.replicas)):
        if (hi - lo) % config.batch_size == 1:
            raise ConfigError(
                f"batch_size: replica {r}'s {hi - lo} examples end each epoch with a "
                f"mini-batch of one, which BatchNorm cannot train on; choose another batch size"
            )


def epoch_steps(examples: int, config: DownpourConfig) -> int:
    """Steps (mini-batches over all replicas) of one epoch: the default checkpoint period."""
    ranges = replica_ranges(examples, config.replicas)
    return sum(-(-(hi - lo) // config.batch_size) for lo, hi in ranges)
