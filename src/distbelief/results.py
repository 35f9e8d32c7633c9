"""What a run gives back: its progress as it goes (:class:`ProgressReport`, to a ``progress``
callback) and its outcome (:class:`TrainResult` with its :class:`History`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """Master -> driver: how far training has come (for progress display)."""

    examples: int
    """Training examples processed so far, over all replicas."""
    total_examples: int
    """Training examples the run will process in all."""
    loss: float
    """Mean training loss over the steps since the previous report."""
    wall_s: float
    """Seconds since training began."""
    replica_steps: tuple[int, ...] = ()
    """Steps each replica has completed so far, by replica."""
    replica_examples: tuple[int, ...] = ()
    """Examples each replica has processed so far, by replica."""
    replica_loss: tuple[float | None, ...] = ()
    """Each replica's mean training loss since the previous report (None: no step since)."""
    shard_stats: tuple[dict[str, Any], ...] = ()
    """Each shard's latest counters (see ``ShardStats``), as of its last reply; () before."""
    evaluation: dict[str, float] | None = None
    """Set when this report announces an evaluation during training: its ``loss`` (and
    ``accuracy``), measured at ``examples`` and ``wall_s``."""


@dataclass
class History:
    """What happened during a run."""

    train: list[dict[str, float]] = field(default_factory=list)
    """Training loss points: ``{"examples", "wall_s", "loss"}`` (mean loss since the last)."""
    eval: list[dict[str, float]] = field(default_factory=list)
    """Evaluation points on eval data: ``{"examples", "wall_s", "loss", "accuracy"?}``."""

    @property
    def final_loss(self) -> float | None:
        """The last training loss point."""
        return self.train[-1]["loss"] if self.train else None

    @property
    def accuracy(self) -> float | None:
        """The last evaluation accuracy, if eval data and an accuracy metric were given."""
        return self.eval[-1].get("accuracy") if self.eval else None


@dataclass
class TrainResult:
    """The outcome of :func:`train`."""

    model: nn.Sequential
    """A new module with the shards' final parameters (and replica 0's buffers)."""
    history: History
    """Loss curve and evaluation points."""
    stats: dict[str, Any]
    """Counters: updates applied per shard, staleness mean/max, rejected pushes, timings."""
    config: Any
    """The configuration the run used (its algorithm's config dataclass), with the seed that was
    drawn if none was given."""
