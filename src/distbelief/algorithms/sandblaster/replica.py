"""SandblasterReplica: one model replica computing gradients of portions for the coordinator,
alone or, split into stages and partitions, with its partition actors (``partition.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...core.blocks import Split
from ...core.flat import bind_to_flat, parameters_of
from ...core.layout import Range
from ...runtime.base import Actor, receives
from .messages import (
    Assign,
    ConnectReplica,
    ConnectSandblaster,
    FetchPoint,
    Flush,
    PartitionForward,
    PartitionGrad,
    PartitionOutput,
    PartitionParamGrad,
    PartitionRestarted,
    PartitionWeights,
    Point,
    PortionDone,
    PushGradient,
    Tick,
    Ticket,
    Verdict,
)
from .portions import batch_indices, batch_size_of, portion_range

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TICKS_PER_PORTION = 3
"""Deliveries another replica needs per portion on a one-thread runtime (an assignment, a
verdict, ...): a replica slowed ``k`` times waits ``(k - 1)`` times this many turns."""


@dataclass(frozen=True)
class ReplicaSplit:
    """How a replica is split into partitions (``stages`` x ``partitions`` actors)."""

    stages: int
    partitions: int
    owners: tuple[tuple[Range, ...], ...]
    """Per partition, owner ``stage * partitions + block``: its ranges of the flat space."""
    output: Split | None
    """How the last stage's output is cut among its partitions (None: one partition)."""


class SandblasterReplica(Actor):
    """The whole model and the whole training set (a portion may be any replica's: backup
    tasks, failures). With ``split`` (stages x partitions > 1) the model's forward and
    backward passes are its partition actors' (``partition.py``): it sends them the point and
    the portion's inputs, takes the loss of the output pieces they send, and lays the
    gradients of their parameters into the flat gradient.

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
        split: ReplicaSplit | None = None,
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
        # Split into partitions: their refs, the pass under way, what has come back of it.
        self.split = split
        self.partitions: tuple = ()
        self.passes = 0  # passes started by this incarnation (a ticket's second half)
        self.ticket: Ticket = (-1, -1)
        self.running: tuple[Assign, torch.Tensor, torch.Tensor, float] | None = None
        self.outputs: dict[int, torch.Tensor] = {}
        self.param_grads: dict[int, torch.Tensor] = {}
        self.crossed_bytes = 0  # that the partitions sent each other in the pass under way
        self.loss_sum = 0.0
        # Frozen parameters' ranges: their gradient is zero, as unsplit (autograd skips them).
        self.frozen: list[Range] = []
        offset = 0
        for p in self.params:
            if not p.requires_grad:
                self.frozen.append((offset, offset + p.numel()))
            offset += p.numel()

    @receives(ConnectSandblaster)
    def on_connect(self, msg: ConnectSandblaster, sender: object) -> None:
        self.shards, self.coordinator = msg.shards, msg.coordinator

    @receives(ConnectReplica)
    def on_connect_replica(self, msg: ConnectReplica, sender: object) -> None:
        self.partitions = msg.partitions

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
        if self.fetching == 0 and self.split is not None:
            for k in range(len(self.partitions)):
                self._send_point(k)
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

    def _portion(self, msg: Assign) -> tuple[torch.Tensor, torch.Tensor]:
        """The portion's examples: inputs and targets."""
        lo, hi = portion_range(self.batch_examples, self.portions, msg.portion)
        order = self._examples(msg.batch)
        if order is None:
            return self.inputs[lo:hi], self.targets[lo:hi]
        return self.inputs[order[lo:hi]], self.targets[order[lo:hi]]

    def _compute(self, msg: Assign) -> None:
        t0 = time.perf_counter()
        x, y = self._portion(msg)
        if self.split is not None:
            self.running = (msg, x, y, t0)
            self._start_pass()
            return
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
        self._computed(msg, flat, loss.item(), len(x), t0)

    def _computed(
        self, msg: Assign, flat: torch.Tensor, loss: float, n: int, t0: float, crossed: int = 0
    ) -> None:
        """The portion's gradient (of its loss sum) is in: hold it for the verdict and report
        the loss sum (after the slow-down, if any) and the bytes its partitions exchanged."""
        self.held = (msg, flat)
        done = PortionDone(
            self.replica, msg.generation, msg.evaluation, msg.portion, loss, n, crossed
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

    # -------------------------------------------------------------- split into partitions

    def _send_point(self, owner: int) -> None:
        """Partition ``owner``'s ranges of the point held (copies: ``weights`` is reused)."""
        assert self.split is not None
        ranges = self.split.owners[owner]
        values = torch.cat([self.weights[lo:hi] for lo, hi in ranges]) if ranges else None
        if values is None:
            values = self.weights.new_empty(0)
        self.ctx.tell(self.partitions[owner], PartitionWeights(self.fetched, values))

    def _start_pass(self) -> None:
        """Start the pass of the portion under way with a new ticket: its inputs to every
        partition of the first stage (each drops what it held of an older ticket)."""
        assert self.split is not None and self.running is not None
        msg, x, _, _ = self.running
        self.ticket = (msg.generation, self.passes)
        self.passes += 1
        self.outputs, self.param_grads, self.crossed_bytes = {}, {}, 0
        x = x.clone() if x._base is not None else x  # a view would carry the whole batch
        forward = PartitionForward(self.ticket, msg.step, msg.evaluation, x)
        for ref in self.partitions[: self.split.partitions]:
            self.ctx.tell(ref, forward)

    @receives(PartitionOutput)
    def on_partition_output(self, msg: PartitionOutput, sender: object) -> None:
        if msg.ticket != self.ticket or self.running is None or self.split is None:
            return  # of a pass given up (a restart)
        self.outputs[msg.src] = msg.piece
        P = self.split.partitions
        if len(self.outputs) < P:
            return
        assign, _, y, _ = self.running
        pieces = [self.outputs[b] for b in range(P)]
        self.outputs = {}
        out = pieces[0] if self.split.output is None else self.split.output.assemble(pieces)
        out = out.detach().requires_grad_()
        # The portion's loss sum, as unsplit (see _compute).
        loss = self.loss_fn(out, y) * len(y)
        (grad,) = torch.autograd.grad(loss, out)
        self.loss_sum = loss.item()
        grads = [grad] if self.split.output is None else self.split.output.cut(grad)
        last = self.partitions[(self.split.stages - 1) * P :]
        for ref, piece in zip(last, grads, strict=True):
            self.ctx.tell(ref, PartitionGrad(self.ticket, assign.step, -1, piece.clone()))

    @receives(PartitionParamGrad)
    def on_partition_param_grad(self, msg: PartitionParamGrad, sender: object) -> None:
        if msg.ticket != self.ticket or self.running is None or self.split is None:
            return
        self.param_grads[msg.owner] = msg.grad
        self.crossed_bytes += msg.crossed_bytes
        if len(self.param_grads) < len(self.split.owners):
            return
        flat = torch.zeros_like(self.weights)
        for owner, ranges in enumerate(self.split.owners):
            grad, offset = self.param_grads[owner], 0
            for lo, hi in ranges:
                flat[lo:hi] = grad[offset : offset + hi - lo]
                offset += hi - lo
        for lo, hi in self.frozen:
            flat[lo:hi] = 0.0
        assign, _, y, t0 = self.running
        self.running, self.param_grads = None, {}
        self._computed(assign, flat, self.loss_sum, len(y), t0, self.crossed_bytes)

    @receives(PartitionRestarted)
    def on_partition_restarted(self, msg: PartitionRestarted, sender: object) -> None:
        """A partition died and was respawned: its point again (unless one is on its way to
        every partition), and the pass under way redone from its start."""
        if self.fetched and not self.fetching:
            self._send_point(msg.owner)
        if self.running is not None:
            self._start_pass()

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
