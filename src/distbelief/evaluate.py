"""Evaluation: the losses and metrics a run is measured by, the ``Evaluator`` that measures a
flat parameter vector on held-out data, and the assembly of a model from the shards'
parameters. Below the algorithms, which build their results with it."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core.flat import load_flat
from .core.partition import edits_its_input
from .data.formats import FileData
from .errors import TrainingDiverged

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], float]

LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
"""The losses ``train`` takes by name."""


def default_metric(loss: str | LossFn, y: torch.Tensor) -> Metric | None:
    """Accuracy for the built-in losses: argmax for cross-entropy; for mse on 0/1 targets, the
    fraction of examples whose every output is on the right side of 0.5."""
    if loss == "cross_entropy":
        return lambda out, t: float((out.argmax(dim=1) == t).float().mean())
    if loss == "mse" and bool(((y == 0) | (y == 1)).all()):
        return lambda out, t: float(((out > 0.5) == (t > 0.5)).flatten(1).all(1).float().mean())
    return None


class Evaluator:
    """Loss (and accuracy) of a flat parameter vector and replica 0's buffers on held-out data."""

    def __init__(
        self,
        stage_layers: list[list[nn.Module]],
        data: tuple[torch.Tensor, torch.Tensor] | FileData,
        loss_fn: LossFn,
        metric: Metric | None,
        batch_size: int = 4096,
    ) -> None:
        self.stage_lengths = [len(group) for group in stage_layers]
        layers = [layer for group in stage_layers for layer in group]
        self.model = nn.Sequential(*copy.deepcopy(layers)).eval()
        # A file is read a chunk at a time at each evaluation, never held whole.
        self.file = data if isinstance(data, FileData) else None
        self.x, self.y = (None, None) if self.file is not None else data
        self.loss_fn = loss_fn
        self.metric = metric
        self.batch_size = batch_size

    def __call__(
        self, weights: torch.Tensor, buffers: dict[int, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, float]:
        """Metrics of the flat parameters with each stage's buffers (by stage index; a stage
        not given keeps the buffers it had)."""
        load_flat(self.model.children(), weights)
        if buffers:
            stages = range(len(self.stage_lengths))
            load_buffers(self.model, self.stage_lengths, tuple(buffers.get(s) for s in stages))
        return self.evaluate(self.model)

    def evaluate_final(
        self, model: nn.Module, examples: int, wall_s: float, stats: dict[str, Any]
    ) -> dict[str, float]:
        """The final evaluation as a history point (``examples``, ``wall_s`` and the metrics).
        A loss that is not finite raises ``TrainingDiverged``, which keeps ``model``."""
        final = self.evaluate(model)
        if not math.isfinite(final["loss"]):
            loss = final["loss"]
            raise TrainingDiverged(f"the final evaluation loss is {loss}", model, stats)
        return {"examples": examples, "wall_s": wall_s, **final}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of a whole model, buffers included."""
        mode = model.training
        model.eval()
        if self.file is not None:
            metrics = self._evaluate_file(model, self.file)
            model.train(mode)
            return metrics
        copy = edits_its_input(list(model.children()))  # the held-out data stays as it is
        with torch.no_grad():
            batches = self.x.split(self.batch_size)
            out = torch.cat([model(b.clone() if copy else b) for b in batches])
            metrics = {"loss": float(self.loss_fn(out, self.y))}
            if self.metric is not None:
                metrics["accuracy"] = float(self.metric(out, self.y))
        model.train(mode)
        return metrics

    def _evaluate_file(self, model: nn.Module, data: FileData) -> dict[str, float]:
        """Chunk by chunk: loss and accuracy are means over chunks weighted by their size (the
        exact mean for a loss that averages over examples)."""
        sums = {"loss": 0.0, "accuracy": 0.0}
        with torch.no_grad():
            for x, y in data.chunks(self.batch_size):
                out = model(x)  # a fresh tensor per chunk: a layer may edit it in place
                sums["loss"] += float(self.loss_fn(out, y)) * len(x)
                if self.metric is not None:
                    sums["accuracy"] += float(self.metric(out, y)) * len(x)
        keys = ("loss", "accuracy") if self.metric is not None else ("loss",)
        return {k: sums[k] / len(data) for k in keys}


def assemble(
    stage_layers: list[list[nn.Module]], weights: torch.Tensor, buffers: tuple
) -> nn.Sequential:
    """A new model: the layers with these flat parameters and per-stage buffers."""
    model = nn.Sequential(*copy.deepcopy([layer for group in stage_layers for layer in group]))
    load_flat(model.children(), weights)
    load_buffers(model, [len(group) for group in stage_layers], buffers)
    return model


def load_buffers(model: nn.Sequential, stage_lengths: list[int], buffers: tuple) -> None:
    """Load per-stage module buffers (replica 0's: e.g. BatchNorm statistics, which the PS
    does not hold) into the whole model; ``stage_lengths`` are the stages' layer counts."""
    offset = 0
    for length, stage_buffers in zip(stage_lengths, buffers, strict=True):
        if stage_buffers:
            stage_model = nn.Sequential(*[model[offset + i] for i in range(length)])
            stage_model.load_state_dict(stage_buffers, strict=False)
        offset += length
