"""ParameterShard: holds one slice of the flat parameter space and applies pushes as they arrive."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..layout import Segment
from ..messages import (
    Drain,
    Drained,
    Fetch,
    FetchReply,
    Push,
    ShardSnapshot,
    ShardStats,
    Snapshot,
    StatsRequest,
)
from ..optim import make_update_rule
from ..runtime.base import Actor, receives


def finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite. One reduction per tensor on the fast
    path (a NaN or Inf makes a sum non-finite); the exact check, ~30x slower, runs only when
    the sum is not finite (it may also be a finite overflow)."""
    if len(tensors) == 1:  # the common case, without a generator's overhead
        total = tensors[0].sum().item()
    else:
        total = sum(t.sum().item() for t in tensors)
    return math.isfinite(total) or all(bool(torch.isfinite(t).all()) for t in tensors)


class HeldSegment:
    """What a shard keeps of one segment: its values, its optimizer and who reads them.

    ``values`` is lent to the stages that fetch it and never changed while lent: an update
    while some replica still reads it goes to a copy, which becomes ``values`` (copy on write).
    """

    def __init__(
        self, values: torch.Tensor, pieces: list[tuple[int, int]], optimizer: str, lr: float
    ) -> None:
        self.values = values
        # One parameter per piece, over a view: the optimizer updates ``values`` in place.
        # (A slice that is all of ``values`` is not taken: copy_on_write runs often.)
        self.parts = [None if (lo, hi) == (0, len(values)) else slice(lo, hi) for lo, hi in pieces]
        self.params = [nn.Parameter(values[part or slice(None)]) for part in self.parts]
        self.update_rule = make_update_rule(optimizer, self.params, lr)
        self.version = 0
        self.readers: set[int] = set()  # replicas whose stage reads ``values``

    def copy_on_write(self) -> None:
        """Give the parameters a copy of ``values`` to update; the readers keep the old."""
        values = self.values = self.values.clone()
        for p, part in zip(self.params, self.parts):
            p.data = values if part is None else values[part]
        self.readers.clear()

    def apply(self, grads: Sequence[torch.Tensor]) -> None:
        """One optimizer step with the pushed pieces as the gradient."""
        if self.readers:
            self.copy_on_write()
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.update_rule.step()
        for p in self.params:
            p.grad = None
        self.version += 1


class ParameterShard(Actor):
    """One PS shard. Each segment (overlap with a stage) has its own optimizer and version.

    The version of a segment counts the updates applied to it. A stage quotes the version it
    fetched when it pushes, so ``staleness = version now - version fetched`` is the number of
    updates (from other replicas) the gradient did not see.
    """

    updates_applied: int = 0
    """Pushes applied so far (a fault plan can key on it: ``kill:shard1@update=500``)."""

    def __init__(
        self,
        index: int,
        initial: torch.Tensor,
        start: int,
        segments: tuple[Segment, ...],
        optimizer: str,
        lr: float,
    ) -> None:
        self.index = index
        self.held: dict[int, HeldSegment] = {}
        for seg in segments:
            values = initial[seg.start - start : seg.stop - start].clone()
            pieces = [(a - seg.start, b - seg.start) for a, b in seg.pieces]
            self.held[seg.stage] = HeldSegment(values, pieces, optimizer, lr)
        self.updates_applied = 0
        self.rejected_pushes = 0
        self.staleness_sum = 0
        self.staleness_max = 0
        self.staleness_counts: list[int] = []  # entry i: updates applied with staleness i

    @property
    def weights(self) -> torch.Tensor:
        """A copy of the shard's slice (its segments tile it, in order)."""
        return torch.cat([held.values for held in self.held.values()])

    @receives(Fetch)
    def on_fetch(self, msg: Fetch, sender: object) -> None:
        held = self.held[msg.stage]
        held.readers.add(msg.replica)  # lent, not copied: see HeldSegment
        self.ctx.tell(sender, FetchReply(self.index, held.values, held.version))

    @receives(Push)
    def on_push(self, msg: Push, sender: object) -> None:
        held = self.held[msg.stage]
        if msg.done_reading:
            held.readers.discard(msg.replica)
        if not finite(msg.grads):
            self.rejected_pushes += 1  # a NaN/Inf push would poison every replica: drop it
            return
        staleness = held.version - msg.fetched_version
        held.apply(msg.grads)
        self.updates_applied += 1
        self.staleness_sum += staleness
        if staleness > self.staleness_max:
            self.staleness_max = staleness
        counts = self.staleness_counts
        if staleness >= len(counts):
            counts.extend([0] * (staleness + 1 - len(counts)))
        counts[staleness] += 1

    @receives(Drain)
    def on_drain(self, msg: Drain, sender: object) -> None:
        # Per-sender FIFO: every push the stage sent before Drain has been handled.
        self.ctx.tell(sender, Drained(self.index))

    @receives(Snapshot)
    def on_snapshot(self, msg: Snapshot, sender: object) -> None:
        self.ctx.tell(sender, ShardSnapshot(self.index, msg.tag, self.weights, self.stats()))

    @receives(StatsRequest)
    def on_stats_request(self, msg: StatsRequest, sender: object) -> None:
        self.ctx.tell(sender, ShardStats(self.index, self.stats()))

    def stats(self) -> dict[str, Any]:
        """The shard's counters (a copy)."""
        return {
            "updates_applied": self.updates_applied,
            "rejected_pushes": self.rejected_pushes,
            "staleness_sum": self.staleness_sum,
            "staleness_max": self.staleness_max,
            "staleness_histogram": list(self.staleness_counts),
        }
