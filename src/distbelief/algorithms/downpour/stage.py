"""Stage: one partition (a run of layers) of one model replica."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ...core.flat import bind_to_flat, parameters_of
from ...core.layout import Segment
from ...core.partition import edits_its_input
from ...runtime.base import Actor, receives
from .messages import (
    Backward,
    BufferSnapshot,
    CheckpointMark,
    ConnectStage,
    CopyRequest,
    Drain,
    Drained,
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


class Stage(Actor):
    """Owns the modules of its layers; forward on activations, backward on output gradients.

    Fetches its segments from the shards every ``n_fetch`` steps and pushes the gradient
    accrued since its last push every ``n_push`` steps. With ``local_lr > 0`` it also takes the
    paper's local step ``w <- w - local_lr * g`` on its own copy between fetches.

    With ``n_fetch > 1`` the fetch for a step is issued one step ahead, right after the
    previous step's push (the paper's fetch thread running beside compute): its reply travels
    while the rest of the replica works. Sent after that push, on the same ordered channel to
    the same shards, the reply includes it, as a fetch at the start of the step would. With
    ``n_fetch = 1`` it is not: fetching at the end of every step would only make the
    parameters staler by the time they are used (XOR learned on 7 of 10 seeds instead of 10).

    Large parameters are not copied on a fetch: the stage points them at the values the shard
    lends (see ``messages``), and says in its push whether it has stopped reading them. It
    copies into a buffer of its own the parameters that were merged into a piece with others
    (small ones, see ``layout``) or that straddle two shards, and all of them when it takes
    local steps (it must not write into lent values). Gradients are pushed as the tensors
    autograd returned (a slice of one where a parameter straddles two shards), small ones
    concatenated.

    With ``pipeline_depth > 1`` several mini-batches are in flight through the replica, so a
    stage holds up to that many forwards waiting for their backward passes, and **stashes
    weights**: each backward pass (the parameters' gradients and the input's) uses exactly
    the parameter values its own forward pass used, and a fetch that lands in between applies
    from the next forward on. Every fetch (and every local step) makes a fresh version of the
    parameters rather than writing into the last one: the fetched values are copied into a
    flat tensor of its own (a retired version's, reused), the forward runs on it (its tensors
    put in the module's place for the call, as ``torch.func.functional_call`` does), and each
    waiting forward keeps a reference to its version, which nothing writes into again; a
    version is retired with the last forward that used it. So no parameter is read in place
    from lent values, and a push says it is done reading whenever no fetch of its shard is on
    its way.
    A push records the version the oldest of its forwards used. Forwards that arrive while a
    fetch is on its way wait for it and take its values; with ``n_fetch > 1`` the fetch for
    step k is issued ahead, right after the forward of step k - 1.

    Restartable: a runtime may respawn a dead stage from its constructor arguments; it fetches
    before its first forward, and the steps lost with it are redone (see DataShard).
    """

    restartable = True

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
        pipeline_depth: int = 1,
    ) -> None:
        self.replica = replica
        self.index = index
        self.module = nn.Sequential(*layers).train()
        self.copy_input = edits_its_input(layers)  # e.g. ReLU(inplace=True) first
        self.params = parameters_of(self.module.children())
        # Frozen parameters (requires_grad False) get no gradient from autograd; they push
        # zeros, which every update rule turns into no change (they are all elementwise).
        self.trainable = [p for p in self.params if p.requires_grad]
        self.frozen_zeros = {
            i: torch.zeros_like(p) for i, p in enumerate(self.params) if not p.requires_grad
        }
        dtype = self.params[0].dtype if self.params else torch.get_default_dtype()
        self.weights = bind_to_flat(self.module.children(), torch.empty(0, dtype=dtype))
        # Segments in stage-local coordinates: (shard, lo, hi).
        self.segments = [(seg.shard, seg.start - start, seg.stop - start) for seg in segments]
        self.versions = {shard: 0 for shard, _, _ in self.segments}
        self.stash = pipeline_depth > 1  # weight stashing (see the class doc)
        # Per segment: where its pieces lie among the parameters. A piece that is one whole
        # parameter is read in place from the lent values, unless local steps write into it
        # (or versions are stashed: they are copied).
        in_place = local_lr == 0 and not self.stash
        self.pieces = [locate_pieces(self.params, seg, start, in_place) for seg in segments]
        self.read_from: dict[int, torch.Tensor] = {}  # shard -> lent values read in place
        # How each segment's fetch reply is read: (copies, in_place). Copies are (view of
        # the own buffer, slice of the reply or None for all of it), adjacent pieces merged;
        # in_place are (parameter, slice of the reply).
        self.reading = []
        for (_, lo, hi), pieces in zip(self.segments, self.pieces):
            copied = merge_adjacent([(p.lo, p.hi) for p in pieces if not p.in_place])
            copies = [
                (self.weights[lo + a : lo + b], None if (a, b) == (0, hi - lo) else slice(a, b))
                for a, b in copied
            ]
            in_place = [
                (self.params[p.parts[0][0]], slice(p.lo, p.hi)) for p in pieces if p.in_place
            ]
            self.reading.append((copies, in_place))
        self.loss_fn = loss_fn
        self.n_fetch = n_fetch
        self.n_push = n_push
        self.local_lr = local_lr
        self.accrued: tuple[torch.Tensor, ...] | None = None  # per parameter, since the last push
        self.accrued_own = False  # ``accrued`` is this stage's to add into (not autograd's)
        self.accrued_steps = 0
        self.fetched = False  # a new (or restarted) stage fetches before its first forward
        self.pending: list[Forward] = []  # forwards waiting for fetch replies, in order
        self.fetching: set[int] = set()  # shards whose fetch reply is outstanding
        self.prefetched = -1  # the step whose fetch was issued ahead
        self.draining: set[int] = set()  # shards whose drain reply is outstanding
        self.saved: tuple[int, torch.Tensor, torch.Tensor] | None = None  # step, input, output
        self.previous = self.next = self.data_shard = None
        self.shards: tuple = ()
        if self.stash:
            self._init_stash()

    def _init_stash(self) -> None:
        """The state of weight stashing (``pipeline_depth > 1``, see the class doc)."""
        named = list(self.module.named_parameters())
        if [id(p) for _, p in named] != [id(p) for p in self.params]:  # pragma: no cover
            raise ValueError("the stage's parameters are not in the module's order")
        self.names = [name for name, _ in named]
        # Where each parameter sits (module, attribute), to run a forward on a version by
        # putting its tensors there for the call: cheaper than functional_call, which a
        # module whose parameters are shared under two names still takes (it ties them).
        tied = len(list(self.module.named_parameters(remove_duplicate=False))) != len(named)
        self.slots = None if tied else [_slot(self.module, name) for name in self.names]
        if sum(hi - lo for _, lo, hi in self.segments) != self.weights.numel():
            raise ValueError("the stage's segments do not cover its parameters")  # pragma: no cover
        self.trainable_index = [i for i, p in enumerate(self.params) if p.requires_grad]
        # The version the next forward uses: one tensor per parameter, never written into.
        self.current = self._version_of(self.weights.detach().clone())
        # Flat tensors of versions no forward uses any more, for the next fetches to fill: a
        # fresh one per fetch costs more than the copy into it (new pages, cold cache).
        self.spare: list[torch.Tensor] = []
        self.incoming: torch.Tensor | None = None  # the version the fetch on its way fills
        self.incoming_versions: dict[int, int] = {}
        # step -> (input, output, the parameters its forward used, their versions)
        self.waiting: dict[int, tuple[torch.Tensor, torch.Tensor, tuple, dict[int, int]]] = {}
        self.accrued_versions: dict[int, int] | None = None  # the oldest, since the last push

    def _version_of(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One leaf tensor per parameter over ``flat`` (its own storage, read only)."""
        out, offset = [], 0
        for p in self.params:
            k = p.numel()
            leaf = flat[offset : offset + k].view_as(p).detach()
            out.append(leaf.requires_grad_(p.requires_grad))
            offset += k
        version = _Version(out)
        version.flat = flat
        return version

    def _retire(self, version: tuple[torch.Tensor, ...]) -> None:
        """``version`` is neither the current one nor used by a waiting forward: its flat
        tensor may be filled by a later fetch (a version a local step made has none)."""
        if version is self.current or any(w[2] is version for w in self.waiting.values()):
            return
        flat = getattr(version, "flat", None)
        if flat is not None and len(self.spare) <= len(self.waiting):
            version.flat = None
            self.spare.append(flat)

    @receives(ConnectStage)
    def on_connect(self, msg: ConnectStage, sender: object) -> None:
        self.previous, self.next = msg.previous, msg.next
        self.shards, self.data_shard = msg.shards, msg.data_shard

    @receives(Forward)
    def on_forward(self, msg: Forward, sender: object) -> None:
        if self.stash:
            # A forward of a step already here is a redo after a restart: what waits from that
            # step on is of the lost pass (its backward passes are ignored; it is sent again).
            for step in [step for step in self.waiting if step >= msg.step]:
                del self.waiting[step]
            self.pending = [f for f in self.pending if f.step < msg.step]
        if self.fetching:
            self._wait(msg)  # the replies on their way are the parameters for this step
            return
        due = msg.step % self.n_fetch == 0 and self.prefetched != msg.step
        if self.segments and (due or not self.fetched):
            self._wait(msg)
            self.fetch()
        else:
            self._forward(msg)

    def _wait(self, msg: Forward) -> None:
        if self.stash:
            self.pending.append(msg)
        else:
            self.pending = [msg]  # one at a time: a later one replaces it (a redo)

    def fetch(self) -> None:
        """Ask every shard that holds a segment of this stage for its values. Only the replies
        to the fetch in flight are read (``on_fetch_reply``); a test may start one directly."""
        self.fetched = True
        self.fetching = {shard for shard, _, _ in self.segments}
        if self.stash:  # a new version, which the replies fill
            self.incoming = self.spare.pop() if self.spare else torch.empty_like(self.weights)
            self.incoming_versions = {}
        for shard, _, _ in self.segments:
            self.ctx.tell(self.shards[shard], Fetch(self.replica, self.index))

    @receives(FetchReply)
    def on_fetch_reply(self, msg: FetchReply, sender: object) -> None:
        if msg.shard not in self.fetching:
            return  # a reply to the fetch of this stage's previous life, before a restart
        if self.stash:
            self._take_version(msg)
            return
        for (shard, _, _), plan in zip(self.segments, self.reading):
            if shard != msg.shard:
                continue
            values = msg.weights
            copies, in_place = plan
            for dest, part in copies:
                dest.copy_(values if part is None else values[part])
            if in_place and self.read_from.get(shard) is not values:  # in-process, often is
                self.read_from[shard] = values
                for p, part in in_place:
                    p.data = values[part].view_as(p)
            self.versions[shard] = msg.version
        self._fetched(msg.shard)

    def _fetched(self, shard: int) -> None:
        """A reply of the fetch on its way is read: once all are, the waiting forwards run."""
        self.fetching.discard(shard)
        if self.fetching:
            return
        if self.stash and self.incoming is not None:
            old, self.current = self.current, self._version_of(self.incoming)
            self._retire(old)
            self.versions = {**self.versions, **self.incoming_versions}  # (a new dict: stashed)
            self.incoming = None
        # (a forward may issue the next fetch ahead: the rest then wait for it)
        while self.pending and not self.fetching:
            self._forward(self.pending.pop(0))

    def _take_version(self, msg: FetchReply) -> None:
        """Copy a reply's values into the version being fetched (weight stashing): nothing is
        read from the lent values after this."""
        assert self.incoming is not None
        for shard, lo, hi in self.segments:
            if shard == msg.shard:
                self.incoming[lo:hi].copy_(msg.weights)
                self.incoming_versions[shard] = msg.version
        self._fetched(msg.shard)

    def _forward(self, msg: Forward) -> None:
        x = msg.activations
        if self.previous is not None:
            x = x.detach().requires_grad_()
        if self.stash:
            self._forward_stashed(msg, x)
            return
        out = self.module(x.clone() if self.copy_input else x)
        if self.next is not None:
            self.saved = (msg.step, x, out)
            self.ctx.tell(self.next, Forward(msg.step, out.detach(), msg.targets))
            return
        loss = self.loss_fn(out, msg.targets)
        self._backward(msg.step, loss, None, x, loss.item())

    def _forward_stashed(self, msg: Forward, x: torch.Tensor) -> None:
        """The forward on the current version, which the step keeps until its backward."""
        params, versions = self.current, self.versions
        x_in = x.clone() if self.copy_input else x
        if self.slots is None:
            out = functional_call(self.module, dict(zip(self.names, params)), (x_in,))
        else:
            out = _call_with(self.module, self.slots, params, x_in)
        if self.next is not None:
            self.waiting[msg.step] = (x, out, params, versions)
            self.ctx.tell(self.next, Forward(msg.step, out.detach(), msg.targets))
        else:
            loss = self.loss_fn(out, msg.targets)
            self._backward(msg.step, loss, None, x, loss.item(), params, versions)
        if (
            self.n_fetch > 1
            and self.segments
            and not self.fetching
            and (msg.step + 1) % self.n_fetch == 0
        ):
            self.prefetched = msg.step + 1  # the next step's fetch, ahead (see the class doc)
            self.fetch()

    @receives(Backward)
    def on_backward(self, msg: Backward, sender: object) -> None:
        if self.stash:
            waiting = self.waiting.pop(msg.step, None)
            if waiting is None:
                return  # the step was lost with a restarted stage and is being redone
            x, out, params, versions = waiting
            self._backward(msg.step, out, msg.grad, x, msg.loss, params, versions)
            self._retire(params)
            return
        if self.saved is None or self.saved[0] != msg.step:
            return  # the step was lost with a restarted stage and is being redone
        _, x, out = self.saved
        self.saved = None
        self._backward(msg.step, out, msg.grad, x, msg.loss)

    def _backward(
        self,
        step: int,
        root: torch.Tensor,
        root_grad: torch.Tensor | None,
        x: torch.Tensor,
        loss: float,
        params: tuple[torch.Tensor, ...] | None = None,
        versions: dict[int, int] | None = None,
    ) -> None:
        # autograd.grad returns fresh tensors: no .grad fields to zero, and with n_push = 1
        # they are pushed as they are. Stashed: the gradients at the version the forward used.
        wants_input = self.previous is not None
        trainable = self.trainable
        if params is not None:
            trainable = [params[i] for i in self.trainable_index]
        inputs = [*trainable, x] if wants_input else trainable
        grads = (
            torch.autograd.grad(root, inputs, root_grad, allow_unused=True, materialize_grads=True)
            if inputs
            else ()
        )
        if self.params:
            param_grads = grads[: len(trainable)]
            if self.frozen_zeros:
                trained = iter(param_grads)
                param_grads = tuple(
                    self.frozen_zeros[i] if i in self.frozen_zeros else next(trained)
                    for i in range(len(self.params))
                )
            if self.local_lr > 0 and self.stash:  # a new version: the stashed ones stay
                with torch.no_grad():
                    self.current = tuple(
                        torch.add(c, g, alpha=-self.local_lr).requires_grad_(c.requires_grad)
                        for c, g in zip(self.current, param_grads)
                    )
            elif self.local_lr > 0:
                with torch.no_grad():
                    for p, g in zip(self.params, param_grads):
                        p.add_(g, alpha=-self.local_lr)
            if self.accrued is None:
                self.accrued, self.accrued_own = param_grads, False
            elif not self.accrued_own:
                # Out of place: a gradient autograd returned may alias a message's tensor;
                # the sum is the stage's own, so later steps add into it (the same values).
                self.accrued = tuple(a + g for a, g in zip(self.accrued, param_grads))
                self.accrued_own = True
            else:
                for a, g in zip(self.accrued, param_grads):
                    a.add_(g)
        if versions is not None:  # the oldest version among the accrued forwards
            old = self.accrued_versions
            self.accrued_versions = (
                versions if old is None else {k: min(v, versions[k]) for k, v in old.items()}
            )
        self.accrued_steps += 1
        if self.accrued_steps == self.n_push:
            # Done reading when the next step fetches first.
            self._push(done_reading=(step + 1) % self.n_fetch == 0)
        if (
            not self.stash
            and self.n_fetch > 1
            and self.segments
            and self.fetched
            and (step + 1) % self.n_fetch == 0
        ):
            self.prefetched = step + 1  # the next step's fetch, ahead (see the class doc)
            self.fetch()
        if wants_input:
            self.ctx.tell(self.previous, Backward(step, grads[-1], loss))
        else:
            self.ctx.tell(self.data_shard, StepDone(step, loss))

    def _push(self, done_reading: bool) -> None:
        accrued, self.accrued = self.accrued, None
        self.accrued_steps = 0
        versions = self.versions
        if self.stash:
            versions, self.accrued_versions = self.accrued_versions or versions, None
        if accrued is None:
            return
        for (shard, _, _), pieces in zip(self.segments, self.pieces):
            grads = tuple(piece.gradient(accrued) for piece in pieces)
            if self.stash:  # it copied what it fetched; not while a reply is on its way
                done_reading = shard not in self.fetching
            push = Push(self.replica, self.index, grads, versions[shard], done_reading)
            self.ctx.tell(self.shards[shard], push)

    @receives(Finish)
    def on_finish(self, msg: Finish, sender: object) -> None:
        if self.accrued_steps:
            self._push(done_reading=True)  # nothing already trained is lost
        if not self.segments:
            self._done()
            return
        self.draining = {shard for shard, _, _ in self.segments}
        for shard, _, _ in self.segments:
            self.ctx.tell(self.shards[shard], Drain(self.index))

    @receives(Drained)
    def on_drained(self, msg: Drained, sender: object) -> None:
        if msg.shard not in self.draining:
            return  # the drain of this stage's previous life, before a restart
        self.draining.discard(msg.shard)
        if not self.draining:
            self._done()

    @receives(CopyRequest)
    def on_copy_request(self, msg: CopyRequest, sender: object) -> None:
        # What was on its way to the dead shard is lost: ask the new one again.
        if msg.shard in self.fetching:
            self.ctx.tell(self.shards[msg.shard], Fetch(self.replica, self.index))
        if msg.shard in self.draining:
            self.ctx.tell(self.shards[msg.shard], Drain(self.index))
        # The values as the stage reads them now: what it fetched at ``versions[shard]``
        # (with local steps, moved on by them), or before any fetch the initial values,
        # which are version 0. Its parameters laid end to end are the stage's range, so a
        # segment is a slice of their concatenation.
        length, values, version = 0, None, -1
        params = self.current if self.stash else self.params
        for shard, lo, hi in self.segments:
            if shard == msg.shard:
                flat = torch.cat([p.detach().reshape(-1) for p in params])
                length, values, version = hi - lo, flat[lo:hi].clone(), self.versions[shard]
        self.ctx.tell(
            sender, SegmentCopy(msg.shard, self.replica, self.index, length, values, version)
        )

    @receives(CheckpointMark)
    def on_checkpoint_mark(self, msg: CheckpointMark, sender: object) -> None:
        # Behind this stage's pushes on each channel: see CheckpointRequest.
        for shard, _, _ in self.segments:
            self.ctx.tell(self.shards[shard], msg)

    @receives(BufferSnapshot)
    def on_buffer_snapshot(self, msg: BufferSnapshot, sender: object) -> None:
        self.ctx.tell(sender, StageBuffers(msg.tag, self.index, self._buffers()))

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.named_buffers()}

    def _done(self) -> None:
        self.ctx.tell(self.data_shard, StageDone(self.index, self._buffers()))


def _slot(module: nn.Module, name: str) -> tuple[dict, str]:
    """The parameter dict of the submodule that holds parameter ``name``, and its key there."""
    owner, _, attr = name.rpartition(".")
    return module.get_submodule(owner)._parameters, attr


def _call_with(
    module: nn.Module, slots: list[tuple[dict, str]], params: tuple, x: torch.Tensor
) -> torch.Tensor:
    """``module(x)`` with ``params`` in place of its parameters for the call (a stashed
    version: autograd records these tensors), the parameters put back afterwards."""
    old = [table[key] for table, key in slots]
    for (table, key), p in zip(slots, params):
        table[key] = p
    try:
        return module(x)
    finally:
        for (table, key), p in zip(slots, old):
            table[key] = p


class _Version(tuple):
    """A stashed version of a stage's parameters (a leaf tensor each) and ``flat``, the tensor
    they are views of (None once the flat is handed on for reuse)."""

    flat: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class Piece:
    """Where one piece of a segment lies among a stage's parameters."""

    lo: int
    """Start of the piece within the segment."""
    hi: int
    """End of the piece within the segment."""
    parts: tuple[tuple[int, int, int], ...]
    """``(parameter index, lo, hi)``: the elements ``[lo, hi)`` of the flattened parameter,
    in order; several when small parameters were merged into the piece."""
    in_place: bool
    """The piece is one whole parameter, read in place from the lent values."""

    def gradient(self, grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The piece's part of the per-parameter gradients, 1-D (a copy only when merged)."""
        if len(self.parts) == 1:
            i, lo, hi = self.parts[0]
            return _part(grads[i], lo, hi)
        return torch.cat([_part(grads[i], lo, hi) for i, lo, hi in self.parts])


def _part(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat if lo == 0 and hi == flat.numel() else flat[lo:hi]


def merge_adjacent(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ordered ranges with each run of touching ranges merged into one."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def locate_pieces(
    params: list[nn.Parameter], seg: Segment, start: int, in_place: bool
) -> list[Piece]:
    """The pieces of ``seg`` located among ``params`` (laid end to end from ``start``); with
    ``in_place`` those that are one whole parameter are marked to be read in place."""
    bounds = []  # (first, stop) of each parameter in the flat space
    offset = start
    for p in params:
        bounds.append((offset, offset + p.numel()))
        offset += p.numel()
    out = []
    for a, b in seg.pieces:
        parts = tuple(
            (i, max(a, lo) - lo, min(b, hi) - lo)
            for i, (lo, hi) in enumerate(bounds)
            if max(a, lo) < min(b, hi)
        )
        i, lo, hi = parts[0]
        whole = len(parts) == 1 and lo == 0 and hi == params[i].numel()
        out.append(Piece(a - seg.start, b - seg.start, parts, in_place and whole))
    return out
