"""Messages between every algorithm's driver and the actor it converses with (the master or
the coordinator)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------- driver <-> master


@dataclass(frozen=True, slots=True)
class Begin:
    """Driver -> master: start training; the master replies to the sender when done."""


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
