"""SandblasterReplica: one model replica computing gradients of portions for the coordinator."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ...core.flat import bind_to_flat, parameters_of
from ...runtime.base import Actor, receives
from .messages import (
    Assign,
    ConnectSandblaster,
    FetchPoint,
    Flush,
    Point,
    PortionDone,
    PushGradient,
    Tick,
    Verdict,
)
from .portions import batch_indices, batch_size_of, portion_range

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TICKS_PER_PORTION = 3
"""Deliveries another replica needs per portion on a one-thread runtime (an assignment, a
verdict, ...): a replica slowed ``k`` times waits ``(k - 1)`` times this many turns."""


class SandblasterReplica(Actor):
    """The whole model (Sandblaster's replicas are not split into stages here) and the whole
    training set (a portion may be any replica's: backup tasks, failures).

    It fetches the point ``"w"`` from the shards once per function evaluation, computes the
    gradient of each portion it is assigned, holds it until the coordinator's verdict (the
    first result for a portion counts), adds the accepted ones up and pushes the sum to the
    shards every ``push_every`` accepted portions and when the evaluation is done.

    ``slowdown`` > 1 makes each portion take that many times as long (benchmarks and tests):
    a sleep where actors run in parallel, turns of the run queue where they share one thread.

    Restartable: a new incarnation has lost its sums; the coordinator hands its portions out
    again and stamps new assignments with a new generation, so the shards tell its old pushes
    apart.
    """

    restartable = True

    def __init__(
        self,
        replica: int,
        layers: list[nn.Module],
        loss_fn: LossFn,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        shard_ranges: tuple[tuple[int, int], ...],
        batch_size: int | None,
        portions: int,
        seed: int,
        push_every: int,
        slowdown: float = 1.0,
        single_threaded: bool = True,
    ) -> None:
        self.replica = replica
        self.module = nn.Sequential(*layers).train()
        self.params = parameters_of(self.module.children())
        self.trainable = [p.requires_grad for p in self.params]
        dtype = self.params[0].dtype
        self.weights = bind_to_flat(self.module.children(), torch.empty(0, dtype=dtype))
        self.loss_fn = loss_fn
        self.inputs, self.targets = inputs, targets
        self.shard_ranges = shard_ranges
        self.batch_size = batch_size
        self.batch_examples = batch_size_of(len(inputs), batch_size)
        self.portions = portions
        self.seed = seed
        self.push_every = push_every
        self.slowdown = slowdown
        self.single_threaded = single_threaded
        self.shards: tuple = ()
        self.coordinator = None
        self.fetched = 0  # the evaluation whose point the replica holds
        self.fetching = 0  # point slices outstanding
        self.waiting: Assign | None = None  # the assignment waiting for the point
        self.held: tuple[Assign, torch.Tensor] | None = None  # gradient awaiting its verdict
        self.accrued: torch.Tensor | None = None  # sum of accepted, not yet pushed
        self.accrued_portions = 0
        self.accrued_for: tuple[int, int] = (0, 0)  # (evaluation, generation) of the sum
        self._batch: tuple[int, torch.Tensor | None] = (-1, None)

    @receives(ConnectSandblaster)
    def on_connect(self, msg: ConnectSandblaster, sender: object) -> None:
        self.shards, self.coordinator = msg.shards, msg.coordinator

    @receives(Assign)
    def on_assign(self, msg: Assign, sender: object) -> None:
        if msg.evaluation != self.fetched:
            self.waiting = msg
            self.fetching = len(self.shards)
            self.fetched = msg.evaluation
            for shard in self.shards:
                self.ctx.tell(shard, FetchPoint(msg.evaluation))
            return
        self._compute(msg)

    @receives(Point)
    def on_point(self, msg: Point, sender: object) -> None:
        lo, hi = self.shard_ranges[msg.shard]
        self.weights[lo:hi].copy_(msg.values)
        self.fetching -= 1
        if self.fetching == 0 and self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            self._compute(waiting)

    def _examples(self, batch: int) -> torch.Tensor | None:
        if self._batch[0] != batch:
            self._batch = (
                batch,
                batch_indices(len(self.inputs), self.batch_size, self.seed, batch),
            )
        return self._batch[1]

    def _compute(self, msg: Assign) -> None:
        t0 = time.perf_counter()
        lo, hi = portion_range(self.batch_examples, self.portions, msg.portion)
        order = self._examples(msg.batch)
        if order is None:
            x, y = self.inputs[lo:hi], self.targets[lo:hi]
        else:
            x, y = self.inputs[order[lo:hi]], self.targets[order[lo:hi]]
        # The loss of the portion as a sum over its examples (the loss function averages), so
        # portions add up to the batch's sum whatever their sizes.
        loss = self.loss_fn(self.module(x), y) * len(x)
        trainable = [p for p, t in zip(self.params, self.trainable) if t]
        grads = iter(
            torch.autograd.grad(loss, trainable, allow_unused=True, materialize_grads=True)
        )
        flat = torch.cat(
            [
                next(grads).reshape(-1) if t else torch.zeros(p.numel(), dtype=p.dtype)
                for p, t in zip(self.params, self.trainable)
            ]
        )
        self.held = (msg, flat)
        done = PortionDone(
            self.replica, msg.generation, msg.evaluation, msg.portion, loss.item(), len(x)
        )
        self._pending_done = done
        if self.slowdown > 1.0:
            if not self.single_threaded:
                time.sleep((self.slowdown - 1.0) * (time.perf_counter() - t0))
            else:
                turns = round((self.slowdown - 1.0) * TICKS_PER_PORTION)
                if turns > 0:
                    self.ctx.tell(self.ctx.self_ref, Tick(turns - 1))
                    return
        self.ctx.tell(self.coordinator, done)

    @receives(Tick)
    def on_tick(self, msg: Tick, sender: object) -> None:
        if msg.left > 0:
            self.ctx.tell(self.ctx.self_ref, Tick(msg.left - 1))
        else:
            self.ctx.tell(self.coordinator, self._pending_done)

    @receives(Verdict)
    def on_verdict(self, msg: Verdict, sender: object) -> None:
        if self.held is None:
            return
        assign, grad = self.held
        if (assign.evaluation, assign.portion) != (msg.evaluation, msg.portion):
            return
        self.held = None
        if not msg.accepted:
            return
        key = (assign.evaluation, assign.generation)
        if self.accrued is not None and self.accrued_for != key:
            self._push()  # cannot happen in order; kept safe: never mix evaluations
        if self.accrued is None:
            self.accrued, self.accrued_for = grad, key
        else:
            self.accrued = self.accrued + grad  # out of place: a pushed slice stays as sent
        self.accrued_portions += 1
        if self.accrued_portions >= self.push_every:
            self._push()

    @receives(Flush)
    def on_flush(self, msg: Flush, sender: object) -> None:
        if self.accrued is not None and self.accrued_for[0] == msg.evaluation:
            self._push()

    def _push(self) -> None:
        accrued, self.accrued = self.accrued, None
        count, self.accrued_portions = self.accrued_portions, 0
        if accrued is None:
            return
        evaluation, generation = self.accrued_for
        for shard, (lo, hi) in zip(self.shards, self.shard_ranges, strict=True):
            push = PushGradient(evaluation, self.replica, generation, count, accrued[lo:hi])
            self.ctx.tell(shard, push)
