"""Stage: one partition (a run of layers) of one model replica."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..flat import bind_to_flat
from ..layout import Segment
from ..messages import (
    Backward,
    ConnectStage,
    Drain,
    Drained,
    Fetch,
    FetchReply,
    Finish,
    Forward,
    Push,
    StageDone,
    StepDone,
)
from ..runtime.base import Actor, receives

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Stage(Actor):
    """Owns the modules of its layers; forward on activations, backward on output gradients.

    Fetches its segments from the shards every ``n_fetch`` steps and pushes the gradient
    accrued since its last push every ``n_push`` steps. With ``local_lr > 0`` it also takes the
    paper's local step ``w <- w - local_lr * g`` on its own copy between fetches.
    """

    def __init__(
        self,
        replica: int,
        index: int,
        layers: list[nn.Module],
        segments: tuple[Segment, ...],
        start: int,
        loss_fn: LossFn | None,
        n_fetch: int,
        n_push: int,
        local_lr: float = 0.0,
    ) -> None:
        self.replica = replica
        self.index = index
        self.module = nn.Sequential(*layers).train()
        params = list(self.module.parameters())
        dtype = params[0].dtype if params else torch.get_default_dtype()
        self.weights, self.grads = bind_to_flat(self.module.children(), dtype)
        # Segments in stage-local coordinates: (shard, lo, hi).
        self.segments = [(seg.shard, seg.start - start, seg.stop - start) for seg in segments]
        self.versions = {shard: 0 for shard, _, _ in self.segments}
        self.loss_fn = loss_fn
        self.n_fetch = n_fetch
        self.n_push = n_push
        self.local_lr = local_lr
        # With a local step, this step's gradient is applied locally and also accrued here.
        self.accrued = torch.zeros_like(self.grads) if local_lr > 0 else self.grads
        self.steps = 0  # completed steps (backward done)
        self.accrued_steps = 0  # steps accrued since the last push
        self.fetched = False  # a new (or restarted) stage fetches before its first forward
        self.pending: Forward | None = None  # forward waiting for fetch replies
        self.awaiting = 0  # fetch or drain replies outstanding
        self.saved: tuple[torch.Tensor, torch.Tensor] | None = None
        self.previous = self.next = self.data_shard = None
        self.shards: tuple = ()

    @receives(ConnectStage)
    def on_connect(self, msg: ConnectStage, sender: object) -> None:
        self.previous, self.next = msg.previous, msg.next
        self.shards, self.data_shard = msg.shards, msg.data_shard

    @receives(Forward)
    def on_forward(self, msg: Forward, sender: object) -> None:
        if self.segments and (msg.step % self.n_fetch == 0 or not self.fetched):
            self.fetched = True
            self.pending = msg
            self.awaiting = len(self.segments)
            for shard, _, _ in self.segments:
                self.ctx.tell(self.shards[shard], Fetch(self.index))
        else:
            self._forward(msg)

    @receives(FetchReply)
    def on_fetch_reply(self, msg: FetchReply, sender: object) -> None:
        for shard, lo, hi in self.segments:
            if shard == msg.shard:
                self.weights[lo:hi].copy_(msg.weights)
                self.versions[shard] = msg.version
        self.awaiting -= 1
        if self.awaiting == 0:
            pending, self.pending = self.pending, None
            self._forward(pending)

    def _forward(self, msg: Forward) -> None:
        x = msg.activations
        if self.previous is not None:
            x = x.detach().requires_grad_()
        out = self.module(x)
        if self.next is not None:
            self.saved = (x, out)
            self.ctx.tell(self.next, Forward(msg.step, out.detach(), msg.targets))
            return
        loss = self.loss_fn(out, msg.targets)
        loss.backward()
        self._after_backward(msg.step, x, loss.item())

    @receives(Backward)
    def on_backward(self, msg: Backward, sender: object) -> None:
        x, out = self.saved
        self.saved = None
        out.backward(msg.grad)
        self._after_backward(msg.step, x, msg.loss)

    def _after_backward(self, step: int, x: torch.Tensor, loss: float) -> None:
        if self.local_lr > 0:
            self.accrued.add_(self.grads)
            self.weights.add_(self.grads, alpha=-self.local_lr)
            self.grads.zero_()
        self.steps += 1
        self.accrued_steps += 1
        if self.accrued_steps == self.n_push:
            self._push()
        if self.previous is not None:
            self.ctx.tell(self.previous, Backward(step, x.grad, loss))
        else:
            self.ctx.tell(self.data_shard, StepDone(step, loss))

    def _push(self) -> None:
        for shard, lo, hi in self.segments:
            # Clone: the accumulator is zeroed and reused right after sending.
            grad = self.accrued[lo:hi].clone()
            self.ctx.tell(self.shards[shard], Push(self.index, grad, self.versions[shard]))
        self.accrued.zero_()
        self.accrued_steps = 0

    @receives(Finish)
    def on_finish(self, msg: Finish, sender: object) -> None:
        if self.accrued_steps:
            self._push()  # nothing already trained is lost
        if not self.segments:
            self._done()
            return
        self.awaiting = len(self.segments)
        for shard, _, _ in self.segments:
            self.ctx.tell(self.shards[shard], Drain(self.index))

    @receives(Drained)
    def on_drained(self, msg: Drained, sender: object) -> None:
        self.awaiting -= 1
        if self.awaiting == 0:
            self._done()

    def _done(self) -> None:
        buffers = {k: v.detach().clone() for k, v in self.module.named_buffers()}
        self.ctx.tell(self.data_shard, StageDone(self.index, buffers))
