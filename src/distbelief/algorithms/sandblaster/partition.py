"""SandblasterPartition: one block of one stage of a Sandblaster replica split into S stages x P
partitions (the paper runs Sandblaster with "both data and model parallelism").

The replica actor stays the coordinator's contact (``replica.py``): it fetches the point, cuts
the portion, takes the loss, adds up and pushes the gradient. Its S x P partitions compute the
portion's forward and backward pass between them, each on its own block of units, with the
block machinery of Downpour's partitions (``core.blocks.BlockPass``; with P = 1 a stage is one
block holding all its layers, of any type, :class:`WholePass`). What a pass sends:

- the replica sends each partition its ranges of the point once per evaluation
  (``PartitionWeights``) and the portion's inputs to each partition of the first stage
  (``PartitionForward``);
- within a stage, before each split layer whose input is cut, the parts of its piece the others
  read, and their gradients back (``PartitionExchange``, ``PartitionExchangeGrad``);
- between stages, each partition's output piece to every partition of the next stage
  (``PartitionInput``), and each one's partial gradient of those pieces back
  (``PartitionGrad``, summed by their owner); or, across a ``core.blocks.stage_cut`` (the next
  stage starts with a locally-connected layer), only the part each one's strip reads, and its
  gradient back;
- the last stage's pieces to the replica (``PartitionOutput``), which takes the loss and
  returns each its piece's gradient (``PartitionGrad``); every partition sends the replica the
  gradient of its parameters (``PartitionParamGrad``), which it lays into the flat gradient.

A replica computes one portion at a time, so a partition holds one pass: that of the newest
ticket it has seen. Restartable: a respawned partition tells its replica
(``PartitionRestarted``), which sends it the point again and redoes the portion under way with a
new ticket.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ...core.blocks import (
    BlockPass,
    CutEnds,
    LayerPlan,
    Send,
    Shape,
    Split,
    StagePlan,
    block_leaves,
    block_shapes,
)
from ...core.partition import edits_its_input
from ...runtime.base import Actor, receives
from .messages import (
    ConnectPartition,
    PartitionExchange,
    PartitionExchangeGrad,
    PartitionForward,
    PartitionGrad,
    PartitionInput,
    PartitionOutput,
    PartitionParamGrad,
    PartitionRestarted,
    PartitionWeights,
    Ticket,
)


class WholePass:
    """A whole stage's forward and backward pass as one block (P = 1): :class:`BlockPass`'s
    interface with nothing to exchange, for layers of any type."""

    def __init__(self, layers: Sequence[nn.Module], wants_input: bool) -> None:
        self.layers, self.wants_input = layers, wants_input
        self.output: torch.Tensor | None = None
        self.input_grad: torch.Tensor | None = None
        self.done = False
        self.back = -1
        self._in: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._params: list[torch.Tensor] = []
        self._grads: list[torch.Tensor] = []

    def receive(self, layer: int, src: int, values: torch.Tensor) -> None:  # pragma: no cover
        raise AssertionError("a whole stage exchanges nothing")

    def receive_grad(self, layer: int, dst: int, grad: torch.Tensor) -> None:  # pragma: no cover
        raise AssertionError("a whole stage exchanges nothing")

    def start(self, x: torch.Tensor, params: Sequence[Sequence[torch.Tensor]]) -> list[Send]:
        """The forward pass on the stage's input ``x`` with ``params`` (per layer, leaves)."""
        xin = x.detach()
        if self.wants_input:
            xin = xin.requires_grad_()
        # A layer that edits its input in place gets a copy: a message's tensor is read-only.
        h = xin.clone() if edits_its_input(self.layers) else xin
        for layer, leaves in zip(self.layers, params, strict=True):
            if leaves:
                names = [name for name, _ in layer.named_parameters()]
                h = functional_call(layer, dict(zip(names, leaves, strict=True)), (h,))
            else:
                h = layer(h)
        self._in, self._out = xin, h
        self._params = [p for leaves in params for p in leaves]
        self.output = h.detach()
        return []

    def forward(self) -> list[Send]:  # pragma: no cover (never waits)
        return []

    def backward(self, grad: torch.Tensor | None = None) -> list[Send]:
        """The backward pass from ``grad``, the gradient of the stage's output."""
        assert self._out is not None and self._in is not None and grad is not None
        inputs = ([self._in] if self.wants_input else []) + self._params
        got: Sequence[torch.Tensor] = ()
        if inputs and self._out.requires_grad:
            got = torch.autograd.grad(
                self._out, inputs, grad, allow_unused=True, materialize_grads=True
            )
        elif inputs:  # the output does not depend on them
            got = [torch.zeros_like(t) for t in inputs]
        if self.wants_input:
            self.input_grad, got = got[0], got[1:]
        self._grads = list(got)
        self._in = self._out = None
        self.done = True
        return []

    def flat_param_grad(self) -> torch.Tensor:
        """The parameters' gradients laid end to end (the stage's range of the flat space)."""
        if not self._grads:
            return torch.zeros(0)
        return torch.cat([g.reshape(-1) for g in self._grads])


class _State:
    """What a partition holds of the pass of one ticket."""

    def __init__(self, ticket: Ticket, pass_: BlockPass | WholePass) -> None:
        self.ticket = ticket
        self.pass_ = pass_
        self.step = 0
        self.evaluation = -1
        self.x: torch.Tensor | None = None  # the stage's whole input, once here
        self.inputs: dict[int, torch.Tensor] = {}  # src -> piece (a later stage)
        self.grads: dict[int, torch.Tensor] = {}  # src -> gradient of the output piece
        self.started = False
        self.sent_output = False
        self.backward_started = False
        self.reported = False
        self.crossed_bytes = 0  # sent to the other blocks of its stage


class SandblasterPartition(Actor):
    """Block ``block`` of stage ``stage`` of Sandblaster replica ``replica`` (module doc).

    ``plan`` is the stage's ``core.blocks.StagePlan`` (None with one partition per stage: the
    whole stage, any layers); ``input_split`` how the stage's input is cut among the previous
    stage's partitions (None: it comes whole, from the replica or from one partition);
    ``layers`` the stage's layers (only the block's slices of their parameters are used, and
    only as shapes: the values come from the replica); ``stages`` the replica's stage count;
    ``entry`` and ``next_entry`` the ``core.blocks.stage_cut`` into this stage and into the
    next (None where every piece goes to every block), as Downpour's partitions take them.
    """

    restartable = True

    def __init__(
        self,
        replica: int,
        stage: int,
        block: int,
        plan: StagePlan | None,
        input_split: Split | None,
        layers: list[nn.Module],
        stages: int,
        entry: LayerPlan | None = None,
        next_entry: LayerPlan | None = None,
    ) -> None:
        self.replica_index, self.stage, self.block = replica, stage, block
        self.plan, self.input_split = plan, input_split
        self.cut = CutEnds(block, entry, next_entry)
        self.parts = plan.parts if plan is not None else 1
        self.owner = stage * self.parts + block
        self.last = stage == stages - 1
        self.layers = [layer.train() for layer in layers]
        self.shapes: list[list[Shape]] = (
            block_shapes(plan, block, self.layers)
            if plan is not None
            else [[tuple(p.shape) for p in layer.parameters()] for layer in self.layers]
        )
        self.evaluation = 0  # the evaluation whose point ``leaves`` hold (0: none yet)
        self.leaves: list[list[torch.Tensor]] | None = None
        self.state: _State | None = None
        self.replica: Any = None
        self.peers: tuple = ()
        self.previous: tuple | None = None
        self.next: tuple | None = None

    @receives(ConnectPartition)
    def on_connect(self, msg: ConnectPartition, sender: object) -> None:
        self.replica, self.peers = msg.replica, msg.peers
        self.previous, self.next = msg.previous, msg.next
        if self.restarted:  # its point and its pass died with it: the replica redoes them
            self.ctx.tell(self.replica, PartitionRestarted(self.owner))

    # -------------------------------------------------------------- the point

    def _leaves(self, flat: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per layer, leaf tensors over ``flat`` in the shapes of the block's slices."""
        return block_leaves(self.shapes, flat)

    @receives(PartitionWeights)
    def on_weights(self, msg: PartitionWeights, sender: object) -> None:
        # (never written into: a pass's leaves stay those its forward used)
        self.evaluation, self.leaves = msg.evaluation, self._leaves(msg.values)
        if self.state is not None:
            self._start(self.state)

    # -------------------------------------------------------------- a pass

    def _current(self, ticket: Ticket) -> _State | None:
        """The pass of ``ticket`` (a new one if newer than the one held, which is dropped);
        None for a message of an older one."""
        held = self.state
        if held is not None and held.ticket == ticket:
            return held
        if held is not None and held.ticket > ticket:
            return None
        pass_: BlockPass | WholePass
        if self.plan is not None:
            strips = self.cut.entry is not None
            pass_ = BlockPass(self.plan, self.block, self.layers, self.stage > 0, False, strips)
        else:
            pass_ = WholePass(self.layers, self.stage > 0)
        self.state = _State(ticket, pass_)
        return self.state

    @receives(PartitionForward)
    def on_forward(self, msg: PartitionForward, sender: object) -> None:
        state = self._current(msg.ticket)
        if state is not None and state.x is None:
            state.step, state.evaluation, state.x = msg.step, msg.evaluation, msg.inputs
            self._start(state)

    @receives(PartitionInput)
    def on_input(self, msg: PartitionInput, sender: object) -> None:
        state = self._current(msg.ticket)
        if state is None or state.x is not None:
            return
        state.step, state.evaluation = msg.step, msg.evaluation
        state.inputs[msg.src] = msg.piece
        assert self.previous is not None
        if self.cut.entry is not None:  # a stage cut: only the strip's parts come
            strip = self.cut.strip(state.inputs)
            if strip is not None:
                state.x, state.inputs = strip, {}
                self._start(state)
        elif len(state.inputs) == len(self.previous):
            pieces = [state.inputs[b] for b in range(len(self.previous))]
            split = self.input_split
            state.x = pieces[0] if split is None else split.assemble(pieces)
            state.inputs = {}
            self._start(state)

    def _start(self, state: _State) -> None:
        """Run the forward pass once the input and the evaluation's point are both here."""
        if state.started or state.x is None or self.leaves is None:
            return
        if self.evaluation != state.evaluation:
            return  # the point of the pass's evaluation is on its way from the replica
        state.started = True
        self._send(state, state.pass_.start(state.x, self.leaves))
        self._forward_done(state)

    @receives(PartitionExchange)
    def on_exchange(self, msg: PartitionExchange, sender: object) -> None:
        state = self._current(msg.ticket)
        if state is None:
            return
        state.pass_.receive(msg.layer, msg.src, msg.values)
        if state.started and state.pass_.output is None:
            self._send(state, state.pass_.forward())
            self._forward_done(state)

    def _forward_done(self, state: _State) -> None:
        out = state.pass_.output
        if out is None or state.sent_output:
            return
        state.sent_output = True
        if self.next is not None and self.cut.exit is not None:  # only what each reads
            for dst, part in self.cut.parts(out):
                msg = PartitionInput(state.ticket, state.step, state.evaluation, self.block, part)
                self.ctx.tell(self.next[dst], msg)
        elif self.next is not None:
            for ref in self.next:
                self.ctx.tell(
                    ref, PartitionInput(state.ticket, state.step, state.evaluation, self.block, out)
                )
        else:
            self.ctx.tell(self.replica, PartitionOutput(state.ticket, self.block, out))
        self._backward(state)  # its gradients may have come first (another stage's restart)

    @receives(PartitionGrad)
    def on_grad(self, msg: PartitionGrad, sender: object) -> None:
        state = self._current(msg.ticket)
        if state is None:
            return
        state.grads[msg.src] = msg.grad
        self._backward(state)

    def _backward(self, state: _State) -> None:
        expected = 1 if self.next is None else self.cut.waits_for(len(self.next))
        if state.backward_started or len(state.grads) < expected or not state.sent_output:
            return
        state.backward_started = True
        if self.next is not None and self.cut.exit is not None:  # each for what it read
            assert state.pass_.output is not None
            grad = self.cut.output_grad(state.pass_.output, state.grads)
        else:
            grads = [state.grads[k] for k in sorted(state.grads)]
            grad = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
        state.grads = {}
        self._send(state, state.pass_.backward(grad), back=True)
        self._backward_done(state)

    @receives(PartitionExchangeGrad)
    def on_exchange_grad(self, msg: PartitionExchangeGrad, sender: object) -> None:
        state = self._current(msg.ticket)
        if state is None:
            return
        state.pass_.receive_grad(msg.layer, msg.src, msg.grad)
        if state.pass_.back >= 0:
            self._send(state, state.pass_.backward(), back=True)
            self._backward_done(state)

    def _send(self, state: _State, sends: list[Send], back: bool = False) -> None:
        for dst, layer, values in sends:
            state.crossed_bytes += values.numel() * values.element_size()
            kind = PartitionExchangeGrad if back else PartitionExchange
            message = kind(state.ticket, state.step, layer, self.block, values)
            self.ctx.tell(self.peers[dst], message)

    def _backward_done(self, state: _State) -> None:
        bp = state.pass_
        if not bp.done or state.reported:
            return
        state.reported = True
        grad = bp.flat_param_grad()
        param_msg = PartitionParamGrad(state.ticket, self.owner, grad, state.crossed_bytes)
        self.ctx.tell(self.replica, param_msg)
        if self.previous is not None and self.cut.entry is not None:
            assert bp.input_grad is not None
            for src, g in self.cut.input_grads(bp.input_grad):
                grad_msg = PartitionGrad(state.ticket, state.step, self.block, g)
                self.ctx.tell(self.previous[src], grad_msg)
        elif self.previous is not None:
            assert bp.input_grad is not None
            split = self.input_split
            pieces = [bp.input_grad] if split is None else split.cut(bp.input_grad)
            for b, piece in enumerate(pieces):
                grad_msg = PartitionGrad(state.ticket, state.step, self.block, piece.clone())
                self.ctx.tell(self.previous[b], grad_msg)
