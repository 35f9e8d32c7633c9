"""Partition: one block of one stage of one model replica (the paper's Figure 1).

A stage of P partitions is P of these actors. Block ``b`` holds its share of the units of every
layer of the stage (``core.blocks``: its rows of each ``Linear``, its output positions of each
locally-connected layer) and only their parameters: several disjoint ranges of the flat
parameter space, which it fetches from and pushes to the shards that hold them. What a step
sends (the maths is ``core.blocks.BlockPass``'s; this actor only routes it):

- into the stage: the first stage's partitions each get the whole mini-batch from the data
  shard (``Forward``); a later stage's each get every piece of the stage before's output
  (``BlockInput``, from each of its partitions) and assemble it, or, across a
  ``core.blocks.stage_cut`` (the stage starts with a locally-connected layer), only the parts
  its strip reads;
- within the stage, before each split layer whose input is cut: the parts of its piece the
  others' strips read (``Exchange``: all of it for a ``Linear``, a halo for a locally-connected
  layer), and in the backward pass the gradients of the parts it read (``ExchangeGrad``),
  summed by their owner;
- out of the last stage: each partition sends its output piece to block 0 (``BlockOutput``),
  which assembles the output, takes the loss and returns each its piece's gradient
  (``BlockGrad``); out of an earlier stage's backward pass, each partition sends each of the
  stage before's partitions it read from its piece of its partial input gradient
  (``BlockGrad``), which they sum at its positions; the first stage's partitions each tell
  the data shard the step is done.

Fetches, pushes, ``n_fetch``, ``n_push``, ``local_lr``, drains and checkpoint marks are a
stage's, per partition (its own segments on each shard it meets: an owner of several ranges).
Every fetch makes a new version of its parameters (copied from the replies, never read in
place), which each mini-batch's pass keeps until its backward pass: so with several
mini-batches in flight (``pipeline_depth``) every backward pass uses the parameters its own
forward pass used (weight stashing). With ``n_fetch`` > 1 the fetch of a step that is due is
issued as soon as the step before is done, after its push (as a stage fetches ahead).

Every message of a pass carries the step and its *attempt*: after a restart of any partition
of the replica the data shard sends every mini-batch in flight again with the attempt bumped,
and each partition drops what is left of an older attempt. Restartable: a respawned partition
fetches before its first forward and redoes the steps it is sent again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.blocks import (
    BlockPass,
    CutEnds,
    LayerPlan,
    Send,
    Split,
    StagePlan,
    block_leaves,
    block_parameters,
    block_shapes,
)
from ...core.layout import Range, Segment
from ...runtime.base import Actor, receives
from .messages import (
    BlockGrad,
    BlockInput,
    BlockOutput,
    BufferSnapshot,
    CheckpointMark,
    ConnectPartition,
    CopyRequest,
    Drain,
    Drained,
    Exchange,
    ExchangeGrad,
    Fetch,
    FetchReply,
    Finish,
    Forward,
    Push,
    SegmentCopy,
    StageBuffers,
    StageDone,
    StepDone,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

OVERLAP = False
"""Whether a block hides its halo's hop behind its interior (``BlockPass``'s ``overlap``).
Off: on ``processes`` on one machine the parts' extra compute (a third more per block for the
benchmark's locally-connected net at length 320) cost more than the hops it hid (the profile
in docs/partitions.md); where a hop costs milliseconds (nodes apart) it may pay."""


@dataclass
class _Step:
    """What a partition holds of one mini-batch's pass (one attempt of it)."""

    attempt: int
    pass_: BlockPass
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # src -> piece (stage > 0)
    x: torch.Tensor | None = None  # the stage's input, once whole
    targets: torch.Tensor | None = None
    started: bool = False
    versions: dict[int, int] = field(default_factory=dict)  # of the parameters it used
    params: tuple[torch.Tensor, ...] = ()  # the flat version its forward used
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # block 0 of the last stage
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # src -> output gradient
    loss: float = 0.0


class Partition(Actor):
    """Block ``block`` of stage ``stage`` of replica ``replica`` (see the module doc).

    ``plan`` is the stage's ``core.blocks.StagePlan``; ``input_split`` how the stage's input
    is cut among the previous stage's partitions (None for the first stage: it comes whole);
    ``entry`` and ``next_entry`` the ``core.blocks.stage_cut`` into this stage and into the
    next (None where every piece goes to every block);
    ``layers`` the stage's layers (only the block's slices of their parameters are used);
    ``segments`` the block's segments (``Layout.segments_of_ranges`` of its ``ranges``,
    ``Segment.stage`` being its owner index, ``stage * P + block``); ``loss_fn`` the loss
    (the last stage's block 0 takes it).
    """

    restartable = True

    def __init__(
        self,
        replica: int,
        stage: int,
        block: int,
        plan: StagePlan,
        input_split: Split | None,
        layers: list[nn.Module],
        segments: tuple[Segment, ...],
        ranges: tuple[Range, ...],
        loss_fn: LossFn | None,
        n_fetch: int,
        n_push: int,
        local_lr: float = 0.0,
        entry: LayerPlan | None = None,
        next_entry: LayerPlan | None = None,
    ) -> None:
        self.replica, self.stage, self.block = replica, stage, block
        self.plan, self.input_split = plan, input_split
        self.cut = CutEnds(block, entry, next_entry)
        self.owner = stage * plan.parts + block
        self.layers = [layer.train() for layer in layers]
        self.loss_fn = loss_fn
        self.n_fetch, self.n_push, self.local_lr = n_fetch, n_push, local_lr
        # The block's parameters laid end to end (its ranges in order): its own flat space.
        self.shapes = block_shapes(plan, block, self.layers)
        initial = [
            p.detach().reshape(-1)
            for lp, layer in zip(plan.layers, self.layers)
            for p in block_parameters(lp, block, layer)
        ]
        size = sum(hi - lo for lo, hi in ranges)
        self.weights = torch.cat(initial).clone() if initial else torch.empty(0)
        if self.weights.numel() != size:  # pragma: no cover (plan and ranges disagree)
            raise ValueError(f"partition {self.owner}: {self.weights.numel()} parameters, {size}")
        self.leaves = self._leaves(self.weights)
        # (the layers' own parameters are left as they are: a runtime may respawn this actor
        # from the same arguments; only the leaves above are read and trained)
        # Per shard it meets: its run of the block's flat space and the pieces pushed.
        local, offset = {}, 0
        for lo, hi in ranges:
            local[lo] = offset
            offset += hi - lo
        starts = sorted(local)

        def to_local(position: int) -> int:
            first = max(a for a in starts if a <= position)
            return local[first] + position - first

        spans: dict[int, list[int]] = {}
        self.pieces: dict[int, list[Range]] = {}
        for seg in segments:
            lo = to_local(seg.start)
            span = spans.setdefault(seg.shard, [lo, lo])
            span[1] = lo + seg.size
            self.pieces.setdefault(seg.shard, []).extend(
                (to_local(a), to_local(a) + b - a) for a, b in seg.pieces
            )
        self.spans = {k: (a, z) for k, (a, z) in spans.items()}
        self.keeps = list(self.spans.values()) == [(0, size)]
        """Whether one shard holds all of the block's parameters (its replies are kept)."""
        self.versions = {k: 0 for k in self.spans}
        self.fetched = False
        self.fetching: set[int] = set()
        self.prefetched = -1  # the step whose fetch was issued ahead
        self.incoming: torch.Tensor | None = None
        self.incoming_versions: dict[int, int] = {}
        self.pending: list[tuple[int, int]] = []  # (step, attempt) waiting for a fetch
        self.steps: dict[int, _Step] = {}
        self.accrued: torch.Tensor | None = None
        self.accrued_steps = 0
        self.accrued_versions: dict[int, int] | None = None
        self.draining: set[int] = set()
        self.crossed_bytes = 0
        self.previous: tuple | None = None
        self.next: tuple | None = None
        self.peers: tuple = ()
        self.shards: tuple = ()
        self.data_shard = None

    def _leaves(self, flat: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per layer, leaf tensors over ``flat`` in the shapes of the block's slices."""
        return block_leaves(self.shapes, flat)

    @receives(ConnectPartition)
    def on_connect(self, msg: ConnectPartition, sender: object) -> None:
        self.previous, self.peers, self.next = msg.previous, msg.peers, msg.next
        self.shards, self.data_shard = msg.shards, msg.data_shard

    # -------------------------------------------------------------- a pass's state

    def _state(self, step: int, attempt: int) -> _Step | None:
        """The pass of ``step`` at ``attempt`` (a new one if it is newer than what is held:
        what is left of an older attempt is dropped); None for a message of an older one."""
        held = self.steps.get(step)
        if held is not None and held.attempt == attempt:
            return held
        if held is not None and held.attempt > attempt:
            return None
        pass_ = BlockPass(
            self.plan, self.block, self.layers, self.stage > 0, OVERLAP, self.cut.entry is not None
        )
        state = _Step(attempt, pass_)
        self.steps[step] = state
        return state

    @receives(Forward)
    def on_forward(self, msg: Forward, sender: object) -> None:
        state = self._state(msg.step, msg.attempt)
        if state is not None and state.x is None:
            state.x, state.targets = msg.activations, msg.targets
            self._ready(msg.step, state)

    @receives(BlockInput)
    def on_block_input(self, msg: BlockInput, sender: object) -> None:
        state = self._state(msg.step, msg.attempt)
        if state is None or state.x is not None:
            return
        state.inputs[msg.src] = msg.activations
        state.targets = msg.targets
        if self.cut.entry is not None:  # a stage cut: only the strip's parts come
            strip = self.cut.strip(state.inputs)
            if strip is not None:
                state.x, state.inputs = strip, {}
                self._ready(msg.step, state)
        elif len(state.inputs) == len(self.previous or ()):
            assert self.input_split is not None
            pieces = [state.inputs[b] for b in range(len(state.inputs))]
            state.x, state.inputs = self.input_split.assemble(pieces), {}
            self._ready(msg.step, state)

    def _ready(self, step: int, state: _Step) -> None:
        """The stage's input is here: run, or wait for a fetch (see ``Stage.on_forward``)."""
        if self.fetching:
            self.pending.append((step, state.attempt))
            return
        due = step % self.n_fetch == 0 and self.prefetched != step
        if self.spans and (due or not self.fetched):
            self.pending.append((step, state.attempt))
            self.fetch()
        else:
            self._start(step, state)

    def _start(self, step: int, state: _Step) -> None:
        state.started = True
        state.versions = dict(self.versions)
        state.params = (self.weights,)  # kept alive (and never written into) for its backward
        assert state.x is not None
        self._send(step, state, state.pass_.start(state.x, self.leaves))
        self._forward_more(step, state)
        self._forward_done(step, state)

    def _forward_more(self, step: int, state: _Step) -> None:
        """Carry on while the pass has work it can do now: it returned early to have its halo
        sent before computing its interior (``BlockPass``'s overlap)."""
        while state.pass_.more:
            self._send(step, state, state.pass_.forward())

    def _backward_more(self, step: int, state: _Step) -> None:
        """As :meth:`_forward_more`, backward: the halos' gradients went first."""
        while state.pass_.more:
            self._send(step, state, state.pass_.backward(), back=True)

    @receives(Exchange)
    def on_exchange(self, msg: Exchange, sender: object) -> None:
        state = self._state(msg.step, msg.attempt)
        if state is None:
            return
        state.pass_.receive(msg.layer, msg.src, msg.values)
        if state.started and state.pass_.output is None:
            self._send(msg.step, state, state.pass_.forward())
            self._forward_more(msg.step, state)
            self._forward_done(msg.step, state)

    def _forward_done(self, step: int, state: _Step) -> None:
        out = state.pass_.output
        if out is None:
            return
        if self.next is not None and self.cut.exit is not None:  # only what each reads
            for dst, part in self.cut.parts(out):
                msg = BlockInput(step, state.attempt, self.block, part, state.targets)
                self.ctx.tell(self.next[dst], msg)
        elif self.next is not None:
            for ref in self.next:
                self.ctx.tell(ref, BlockInput(step, state.attempt, self.block, out, state.targets))
        elif self.block == 0:
            state.outputs[0] = out
            self._loss(step, state)
        else:
            self.ctx.tell(self.peers[0], BlockOutput(step, state.attempt, self.block, out))

    @receives(BlockOutput)
    def on_block_output(self, msg: BlockOutput, sender: object) -> None:
        state = self._state(msg.step, msg.attempt)
        if state is not None:
            state.outputs[msg.src] = msg.piece
            self._loss(msg.step, state)

    def _loss(self, step: int, state: _Step) -> None:
        """Block 0 of the last stage, once every piece is in: the loss, and each piece's
        gradient back to its partition."""
        if len(state.outputs) < len(self.peers) or state.targets is None:
            return
        assert self.loss_fn is not None
        split = self.plan.output
        out = split.assemble([state.outputs[b] for b in range(len(self.peers))])
        out = out.detach().requires_grad_()
        loss = self.loss_fn(out, state.targets)
        (grad,) = torch.autograd.grad(loss, out)
        value = loss.item()
        state.outputs = {}
        for b, piece in enumerate(split.cut(grad)):
            if b == 0:
                state.grads[0], state.loss = piece, value
                self._backward(step, state, expected=1)
            else:
                self.ctx.tell(
                    self.peers[b], BlockGrad(step, state.attempt, -1, piece.clone(), value)
                )

    @receives(BlockGrad)
    def on_block_grad(self, msg: BlockGrad, sender: object) -> None:
        state = self._state(msg.step, msg.attempt)
        if state is None:
            return
        state.grads[msg.src], state.loss = msg.grad, msg.loss
        expected = 1 if self.next is None else self.cut.waits_for(len(self.next))
        self._backward(msg.step, state, expected)

    def _backward(self, step: int, state: _Step, expected: int) -> None:
        if len(state.grads) < expected or state.pass_.output is None:
            return
        if self.next is not None and self.cut.exit is not None:  # each for what it read
            grad = self.cut.output_grad(state.pass_.output, state.grads)
        else:
            grads = [state.grads[k] for k in sorted(state.grads)]
            grad = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
        state.grads = {}
        self._send(step, state, state.pass_.backward(grad), back=True)
        self._backward_more(step, state)
        self._step_done(step, state)

    @receives(ExchangeGrad)
    def on_exchange_grad(self, msg: ExchangeGrad, sender: object) -> None:
        state = self._state(msg.step, msg.attempt)
        if state is None:
            return
        state.pass_.receive_grad(msg.layer, msg.src, msg.grad)
        if state.pass_.back >= 0:
            self._send(msg.step, state, state.pass_.backward(), back=True)
            self._backward_more(msg.step, state)
            self._step_done(msg.step, state)

    def _send(self, step: int, state: _Step, sends: list[Send], back: bool = False) -> None:
        for dst, layer, values in sends:
            self.crossed_bytes += values.numel() * values.element_size()
            kind = ExchangeGrad if back else Exchange
            self.ctx.tell(self.peers[dst], kind(step, state.attempt, layer, self.block, values))

    def _step_done(self, step: int, state: _Step) -> None:
        bp = state.pass_
        if not bp.done:
            return
        del self.steps[step]
        if self.spans:
            self._accrue(bp.flat_param_grad(), state.versions)
            if self.accrued_steps == self.n_push:
                self._push()
            self._fetch_ahead(step + 1)
        if self.previous is not None and self.cut.entry is not None:
            assert bp.input_grad is not None
            for src, g in self.cut.input_grads(bp.input_grad):
                grad = BlockGrad(step, state.attempt, self.block, g, state.loss)
                self.ctx.tell(self.previous[src], grad)
        elif self.previous is not None:
            assert self.input_split is not None and bp.input_grad is not None
            for b, piece in enumerate(self.input_split.cut(bp.input_grad)):
                grad = BlockGrad(step, state.attempt, self.block, piece.clone(), state.loss)
                self.ctx.tell(self.previous[b], grad)
        else:
            self.ctx.tell(self.data_shard, StepDone(step, state.loss, self.block, state.attempt))

    # -------------------------------------------------------------- fetch and push

    def _fetch_ahead(self, step: int) -> None:
        """With ``n_fetch`` > 1, the fetch for ``step``, when it is due, as soon as the step
        before is done (the paper's fetch thread beside compute): after that step's push, on
        the same ordered channels, so the reply includes it, as a fetch when ``step`` arrives
        would; but its reply travels while the step's end goes round the replica. Not when
        ``step`` has started already (mini-batches in flight) or a fetch is on its way."""
        if self.n_fetch == 1 or step % self.n_fetch or self.fetching or not self.fetched:
            return
        held = self.steps.get(step)
        if held is None or not held.started:
            self.prefetched = step
            self.fetch()

    def fetch(self) -> None:
        """Ask every shard holding a segment of this partition for its values (a new
        version of them: see the module doc)."""
        self.fetched = True
        self.fetching = set(self.spans)
        # From one shard, its reply becomes the new version as it is (sent as a copy to
        # keep); from several, each reply is copied into its span of a new one.
        self.incoming = None if self.keeps else torch.empty_like(self.weights)
        self.incoming_versions = {}
        for shard in self.spans:
            self.ctx.tell(self.shards[shard], Fetch(self.replica, self.owner, self.keeps))

    @receives(FetchReply)
    def on_fetch_reply(self, msg: FetchReply, sender: object) -> None:
        if msg.shard not in self.fetching:
            return  # a reply to the fetch of this partition's previous life
        if self.keeps:
            self.incoming = msg.weights
        else:
            assert self.incoming is not None  # made by the fetch
            lo, hi = self.spans[msg.shard]
            self.incoming[lo:hi].copy_(msg.weights)
        self.incoming_versions[msg.shard] = msg.version
        self.fetching.discard(msg.shard)
        if self.fetching:
            return
        self._take(self.incoming)
        self.versions = {**self.versions, **self.incoming_versions}
        self.incoming = None
        pending, self.pending = self.pending, []
        for step, attempt in pending:
            state = self.steps.get(step)
            if state is not None and state.attempt == attempt and not state.started:
                self._start(step, state)

    def _take(self, flat: torch.Tensor) -> None:
        """Make ``flat`` the version the next forwards use (the older stay with theirs)."""
        self.weights = flat
        self.leaves = self._leaves(flat)

    def _accrue(self, grad: torch.Tensor, versions: dict[int, int]) -> None:
        if self.local_lr > 0:  # a new version: the ones passes still use stay as they are
            self._take(torch.add(self.weights, grad, alpha=-self.local_lr))
        # out of place: the sum of gradients may be pushed as it is
        self.accrued = grad if self.accrued is None else self.accrued + grad
        old = self.accrued_versions
        self.accrued_versions = (
            dict(versions) if old is None else {k: min(v, versions[k]) for k, v in old.items()}
        )
        self.accrued_steps += 1

    def _push(self) -> None:
        accrued, self.accrued = self.accrued, None
        versions, self.accrued_versions = self.accrued_versions or self.versions, None
        self.accrued_steps = 0
        if accrued is None:
            return
        for shard, pieces in self.pieces.items():
            grads = tuple(accrued[a:b] for a, b in pieces)
            # It copied what it fetched; but not while a reply is on its way (it is lent).
            done = shard not in self.fetching
            push = Push(self.replica, self.owner, grads, versions[shard], done)
            self.ctx.tell(self.shards[shard], push)

    @receives(Finish)
    def on_finish(self, msg: Finish, sender: object) -> None:
        if self.accrued_steps:
            self._push()  # nothing already trained is lost
        if not self.spans:
            self._done()
            return
        self.draining = set(self.spans)
        for shard in self.spans:
            self.ctx.tell(self.shards[shard], Drain(self.owner))

    @receives(Drained)
    def on_drained(self, msg: Drained, sender: object) -> None:
        if msg.shard not in self.draining:
            return
        self.draining.discard(msg.shard)
        if not self.draining:
            self._done()

    def _done(self) -> None:
        self.ctx.tell(self.data_shard, StageDone(self.owner, {}, self.crossed_bytes))

    @receives(CopyRequest)
    def on_copy_request(self, msg: CopyRequest, sender: object) -> None:
        # As a stage answers (see Stage.on_copy_request), with its segments on that shard.
        if msg.shard in self.fetching:
            self.ctx.tell(self.shards[msg.shard], Fetch(self.replica, self.owner, self.keeps))
        if msg.shard in self.draining:
            self.ctx.tell(self.shards[msg.shard], Drain(self.owner))
        length, values, version = 0, None, -1
        if msg.shard in self.spans:
            lo, hi = self.spans[msg.shard]
            length, values = hi - lo, self.weights[lo:hi].clone()
            version = self.versions[msg.shard]
        copy = SegmentCopy(msg.shard, self.replica, self.owner, length, values, version)
        self.ctx.tell(sender, copy)

    @receives(CheckpointMark)
    def on_checkpoint_mark(self, msg: CheckpointMark, sender: object) -> None:
        for shard in self.spans:  # behind its pushes on each channel: see CheckpointRequest
            self.ctx.tell(self.shards[shard], msg)

    @receives(BufferSnapshot)
    def on_buffer_snapshot(self, msg: BufferSnapshot, sender: object) -> None:
        self.ctx.tell(sender, StageBuffers(msg.tag, self.stage, {}))  # split layers hold none
