"""ParameterShard: holds one slice of the flat parameter space and applies pushes as they arrive."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layout import Segment
from ..messages import Drain, Drained, Fetch, FetchReply, Push, ShardSnapshot, Snapshot
from ..optim import make_update_rule
from ..runtime.base import Actor, receives


def finite(t: torch.Tensor) -> bool:
    """True when every element is finite. One reduction on the fast path (a NaN or Inf makes
    the sum non-finite); the exact check, ~30x slower, runs only when the sum is not finite."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


class ParameterShard(Actor):
    """One PS shard. Each segment (overlap with a stage) has its own optimizer and version.

    The version of a segment counts the updates applied to it. A stage quotes the version it
    fetched when it pushes, so ``staleness = version now - version fetched`` is the number of
    updates (from other replicas) the gradient did not see.
    """

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
        self.weights = initial.clone()
        self.params: dict[int, nn.Parameter] = {}
        self.update_rules: dict[int, torch.optim.Optimizer] = {}
        self.versions: dict[int, int] = {}
        for seg in segments:
            # Parameter over a view: the optimizer updates self.weights in place.
            p = nn.Parameter(self.weights[seg.start - start : seg.stop - start])
            self.params[seg.stage] = p
            self.update_rules[seg.stage] = make_update_rule(optimizer, p, lr)
            self.versions[seg.stage] = 0
        self.updates_applied = 0
        self.rejected_pushes = 0
        self.staleness_sum = 0
        self.staleness_max = 0

    @receives(Fetch)
    def on_fetch(self, msg: Fetch, sender: object) -> None:
        # Clone: the shard keeps updating its slice after the reply is sent.
        weights = self.params[msg.stage].detach().clone()
        self.ctx.tell(sender, FetchReply(self.index, weights, self.versions[msg.stage]))

    @receives(Push)
    def on_push(self, msg: Push, sender: object) -> None:
        grad = msg.grad
        if not finite(grad):
            self.rejected_pushes += 1  # a NaN/Inf push would poison every replica: drop it
            return
        param = self.params[msg.stage]
        param.grad = grad
        self.update_rules[msg.stage].step()
        param.grad = None
        version = self.versions[msg.stage]
        staleness = version - msg.fetched_version
        self.versions[msg.stage] = version + 1
        self.updates_applied += 1
        self.staleness_sum += staleness
        if staleness > self.staleness_max:
            self.staleness_max = staleness

    @receives(Drain)
    def on_drain(self, msg: Drain, sender: object) -> None:
        # Per-sender FIFO: every push the stage sent before Drain has been handled.
        self.ctx.tell(sender, Drained(self.index))

    @receives(Snapshot)
    def on_snapshot(self, msg: Snapshot, sender: object) -> None:
        snapshot = ShardSnapshot(self.index, msg.tag, self.weights.clone(), self.stats())
        self.ctx.tell(sender, snapshot)

    def stats(self) -> dict[str, float]:
        """The shard's counters."""
        return {
            "updates_applied": self.updates_applied,
            "rejected_pushes": self.rejected_pushes,
            "staleness_sum": self.staleness_sum,
            "staleness_max": self.staleness_max,
        }
