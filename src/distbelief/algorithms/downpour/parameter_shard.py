"""ParameterShard: holds one slice of the flat parameter space and applies pushes as they arrive."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ...core.layout import Segment
from ...core.optim import make_update_rule, materialize_state
from ...runtime.base import Actor, receives
from ...storage.checkpoint import ShardState
from .messages import (
    CheckpointMark,
    CheckpointMarked,
    CheckpointRequest,
    Drain,
    Drained,
    Fetch,
    FetchReply,
    Push,
    RestoreShard,
    ShardSnapshot,
    ShardStateReply,
    ShardStats,
    Snapshot,
    StatsRequest,
)


def finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite. One reduction per tensor on the fast
    path (a NaN or Inf makes a sum non-finite); the exact check, ~30x slower, runs only when
    the sum is not finite (it may also be a finite overflow)."""
    if len(tensors) == 1:  # the common case, without a generator's overhead
        total = tensors[0].sum().item()
    else:
        total = sum(t.sum().item() for t in tensors)
    return math.isfinite(total) or all(bool(torch.isfinite(t).all()) for t in tensors)


_UNLOCKED = contextlib.nullcontext()

STALENESS_BUCKETS = 1024
"""Entries of a shard's staleness histogram; the last counts every staleness beyond it."""


class HeldSegment:
    """What a shard keeps of one segment: its values, its optimizer and who reads them.

    ``values`` is lent to the stages that fetch it and never changed while lent: an update
    while some replica still reads it goes to a copy, which becomes ``values`` (copy on write).
    """

    def __init__(
        self,
        values: torch.Tensor,
        pieces: list[tuple[int, int]],
        optimizer: str,
        lr: float,
        positions: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self.values = values
        # Where ``values`` lie in the shard's slice, laid end to end: one range for a stage's
        # segment, one per layer for a partition's (its ranges interleave with the others').
        self.positions = positions or ((0, len(values)),)
        # One parameter per piece, over a view: the optimizer updates ``values`` in place.
        # (A slice that is all of ``values`` is not taken: copy_on_write runs often.)
        self.parts = [None if (lo, hi) == (0, len(values)) else slice(lo, hi) for lo, hi in pieces]
        self.params = [nn.Parameter(values[part or slice(None)]) for part in self.parts]
        self.update_rule = make_update_rule(optimizer, self.params, lr)
        self._rule = (optimizer, lr)  # to start the update rule afresh (restore)
        # The version in a tensor (read through a numpy view: fast scalar updates), so that
        # share_memory can move it with the values.
        self._version_cell = torch.zeros(1, dtype=torch.int64)
        self._version = self._version_cell.numpy()
        self.readers: set[int] = set()  # replicas whose stage reads ``values``

    @property
    def version(self) -> int:
        """Updates applied to the segment so far."""
        return int(self._version[0])

    def share_memory(self) -> None:
        """Move values, version and the update rule's state into shared memory, in place."""
        self.values.share_memory_()  # the parameters are views of it: they follow
        materialize_state(self.update_rule)
        for state in self.update_rule.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.share_memory_()
        self._version_cell.share_memory_()
        self._version = self._version_cell.numpy()  # a view of the moved storage

    def copy_on_write(self) -> None:
        """Give the parameters a copy of ``values`` to update; the readers keep the old."""
        values = self.values = self.values.clone()
        for p, part in zip(self.params, self.parts):
            p.data = values if part is None else values[part]
        self.readers.clear()

    def optimizer_state(self) -> dict[str, Any]:
        """A copy of the update rule's ``state_dict()`` (the shard keeps stepping the original)."""
        return copy.deepcopy(self.update_rule.state_dict())

    def restore(
        self, values: torch.Tensor, version: int, optimizer_state: Mapping[str, Any] | None
    ) -> None:
        """Take ``values``, ``version`` and the update rule's state (``None``: start it afresh).

        Values and state are copied in place, so a shard in shared memory stays shared; the
        readers of the old values get a copy first (they are lent, see the class doc)."""
        if values.shape != self.values.shape:
            raise ValueError(
                f"restore: {values.numel()} values for a segment of {len(self.values)}"
            )
        if self.readers:
            self.copy_on_write()
        self.values.copy_(values)
        self._version[0] = version
        shared = self.values.is_shared()
        if optimizer_state is None and not shared:
            self.update_rule = make_update_rule(self._rule[0], self.params, self._rule[1])
            return
        if not shared:
            self.update_rule.load_state_dict(optimizer_state)
            return
        # Shared memory: write into the tensors every process already maps. A fresh start is
        # zeros, as every rule of optim.UPDATE_RULES begins.
        by_index = (optimizer_state or {}).get("state", {})
        for i, p in enumerate(self.params):
            for key, value in self.update_rule.state[p].items():
                if isinstance(value, torch.Tensor):
                    new = by_index.get(i, {}).get(key) if optimizer_state is not None else None
                    value.copy_(new) if new is not None else value.zero_()

    def apply(self, grads: Sequence[torch.Tensor]) -> None:
        """One optimizer step with the pushed pieces as the gradient, counted in the version."""
        if self.readers:
            self.copy_on_write()
        self.step(grads)
        self.count_update()

    def count_update(self) -> None:
        """One more update in the version (``apply`` does it; a Hogwild push claims it first
        under the shard's lock and steps afterwards without it)."""
        self._version[0] += 1

    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """The update rule's step alone: the caller counts it in the version."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.update_rule.step()
        for p in self.params:
            p.grad = None


class ParameterShard(Actor):
    """One PS shard. Each segment (overlap with a stage) has its own optimizer and version.

    The version of a segment counts the updates applied to it. A stage quotes the version it
    fetched when it pushes, so ``staleness = version now - version fetched`` is the number of
    updates (from other replicas) the gradient did not see.

    Shareable: a runtime running actors in several processes of one machine may host the shard
    in all of them at once (see ``Actor.shareable``). ``share_memory`` then moves the values,
    the update rule's state, the versions and the counters into shared memory, and a fetch
    lends the stage a copy of the values made for it (refreshed in place by its next fetch)
    rather than the values themselves: another process's push may update those at any time.
    Every read or change of the shared state happens under the lock the runtime gives, and only
    that: a pushed gradient's finiteness check runs outside. With ``hogwild`` updates (the
    user's choice, see ``share_memory``) only the bookkeeping does: a push claims its version
    and counts its staleness under the lock, then applies the update rule without it, and a
    fetch copies without it, as Hogwild (Recht et al., 2011) reads and writes shared
    parameters: pushes from two processes may interleave element by element, and a fetch may
    see a push half applied. It removes the wait for the lock, the bulk of what a second core
    costs when replicas share a shard. A lock that offers ``sibling(name)`` (the ``processes``
    runtime's) gives each segment a lock of its own: a fetch or an update of one segment takes
    that one (and the shard's around the counters, briefly), so stages of a pipelined replica
    that fetch and push different segments of one shard at once do not wait for each other;
    what reads or restores every segment takes every lock, the segments' first.

    Restartable: a runtime may respawn a dead shard from its constructor arguments (its
    initial values). The respawned shard holds back every message until the master's
    ``RestoreShard`` gives it its segments again (from the replicas' copies or a checkpoint,
    see ``recovery``); then it handles them in the order they came: fetches are answered
    with the restored values, pushes applied to them.
    """

    shareable = True
    restartable = True

    def __init__(
        self,
        index: int,
        initial: torch.Tensor,
        start: int,
        segments: tuple[Segment, ...],
        optimizer: str,
        lr: float,
        state: ShardState | None = None,
    ) -> None:
        self.index = index
        self.size = len(initial)
        self.held: dict[int, HeldSegment] = {}
        # An owner (a stage, or a partition of one) may hold several segments here, one per
        # range of its own: they are held as one, with one version and one update rule.
        owned: dict[int, list[Segment]] = {}
        for seg in segments:
            owned.setdefault(seg.stage, []).append(seg)
        for owner, segs in owned.items():
            if len(segs) == 1:
                (seg,) = segs
                values = initial[seg.start - start : seg.stop - start].clone()
                pieces = [(a - seg.start, b - seg.start) for a, b in seg.pieces]
                where = ((seg.start - start, seg.stop - start),)
                self.held[owner] = HeldSegment(values, pieces, optimizer, lr, where)
                continue
            values = torch.cat([initial[g.start - start : g.stop - start] for g in segs])
            pieces, positions, offset = [], [], 0
            for g in segs:
                pieces += [(a - g.start + offset, b - g.start + offset) for a, b in g.pieces]
                positions.append((g.start - start, g.stop - start))
                offset += g.size
            self.held[owner] = HeldSegment(values, pieces, optimizer, lr, tuple(positions))
        # The held values laid end to end are the slice in order (one segment per stage):
        # ``weights`` concatenates them; else it puts each at its positions.
        order = [p for held in self.held.values() for p in held.positions]
        self._in_order = order == sorted(order) and all(
            a[1] == b[0] for a, b in zip(order, order[1:])
        )
        # updates_applied, rejected_pushes, staleness_sum, staleness_max: in a tensor so that
        # share_memory can move them, updated through a numpy view (fast scalar updates).
        self._counter_cells = torch.zeros(4, dtype=torch.int64)
        self._counts = self._counter_cells.numpy()
        # entry i: updates applied with staleness i (the last entry: STALENESS_BUCKETS - 1 or
        # more); a tensor for the same reason as the counters
        self._staleness_cells = torch.zeros(STALENESS_BUCKETS, dtype=torch.int64)
        self._staleness = self._staleness_cells.numpy()
        self._copies: dict[tuple[int, int], torch.Tensor] | None = None  # shared: lent copies
        # Held around every read or change of the state above: a no-op where one thread
        # runs the shard, a lock across processes once shared (share_memory).
        self._lock: AbstractContextManager[Any] = contextlib.nullcontext()
        self._segment_locks: dict[int, AbstractContextManager[Any]] = {}  # stage -> its own
        self._hogwild = False
        # A restarted shard's held-back messages (handler, message, sender), until restored.
        self._held_back: list[tuple[Callable, Any, Any]] | None = None
        if state is not None:  # resumed from a checkpoint
            self.restore(state)

    def bound_handlers(self) -> dict[type, Callable[[Any, Any], None]]:
        """As every actor's; a restarted shard's handlers hold messages back until it is
        restored (only then: a shard that never died pays nothing for it)."""
        handlers = super().bound_handlers()
        if not self.restarted:
            return handlers
        self._held_back = []

        def holding(handler: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
            def hold_or_handle(msg: Any, sender: Any) -> None:
                if self._held_back is None:
                    handler(msg, sender)
                else:
                    self._held_back.append((handler, msg, sender))

            return hold_or_handle

        out = {t: holding(h) for t, h in handlers.items()}
        out[RestoreShard] = handlers[RestoreShard]
        # Answered at once: a master restarted meanwhile learns that this shard still waits.
        out[StatsRequest] = handlers[StatsRequest]
        return out

    def _locked(self, stage: int) -> AbstractContextManager[Any]:
        """The lock of segment ``stage``'s values, version and update rule state."""
        return self._segment_locks.get(stage, self._lock)

    @contextlib.contextmanager
    def _all_locked(self) -> Any:
        """Every lock: the segments' in order, then the shard's (the order a push takes them)."""
        with contextlib.ExitStack() as stack:
            for stage in sorted(self._segment_locks):
                stack.enter_context(self._segment_locks[stage])
            stack.enter_context(self._lock)
            yield

    @receives(RestoreShard)
    def on_restore_shard(self, msg: RestoreShard, sender: object) -> None:
        with self._all_locked():
            for stage, held in self.held.items():
                values = msg.values.get(stage)
                if values is not None:
                    version = int(msg.versions.get(stage, 0))
                    held.restore(values, version, msg.optimizer.get(stage))
            counts = self._counts
            counts[0] = sum(held.version for held in self.held.values())
            for i, key in enumerate(("rejected_pushes", "staleness_sum", "staleness_max"), 1):
                counts[i] = int(msg.counters.get(key, 0))
        held_back, self._held_back = self._held_back, None
        for handler, message, who in held_back or ():
            handler(message, who)

    def share_memory(self, lock: AbstractContextManager[Any], hogwild: bool = False) -> None:
        """Move every state a handler changes into shared memory, guarded by ``lock`` from
        now on; with ``hogwild``, updates and fetches leave it out (see the class doc)."""
        for held in self.held.values():
            held.share_memory()
        self._counter_cells.share_memory_()
        self._counts = self._counter_cells.numpy()
        self._staleness_cells.share_memory_()
        self._staleness = self._staleness_cells.numpy()
        self._copies = {}
        self._lock = lock
        self._hogwild = hogwild
        sibling = getattr(lock, "sibling", None)
        if sibling is not None and len(self.held) > 1:
            self._segment_locks = {stage: sibling(f"segment {stage}") for stage in self.held}

    @property
    def updates_applied(self) -> int:
        """Pushes applied so far (a fault plan can key on it: ``kill:shard1@update=500``)."""
        return int(self._counts[0])

    @property
    def rejected_pushes(self) -> int:
        """Pushes dropped because a gradient was not finite."""
        return int(self._counts[1])

    @property
    def weights(self) -> torch.Tensor:
        """A copy of the shard's slice (its segments tile it)."""
        if self._in_order:
            return torch.cat([held.values for held in self.held.values()])
        first = next(iter(self.held.values())).values
        out = torch.empty(self.size, dtype=first.dtype)
        for held in self.held.values():
            offset = 0
            for a, b in held.positions:
                out[a:b] = held.values[offset : offset + b - a]
                offset += b - a
        return out

    def export_state(self) -> ShardState:
        """Everything needed to carry on from here: a copy of the slice, each segment's update
        rule state and version (keyed by stage), and the counters. Takes the shard's locks."""
        with self._all_locked():
            applied, rejected, staleness_sum, staleness_max = (int(c) for c in self._counts)
            weights = self.weights
            optimizer = {stage: held.optimizer_state() for stage, held in self.held.items()}
            versions = {stage: held.version for stage, held in self.held.items()}
        return ShardState(
            index=self.index,
            weights=weights,
            optimizer=optimizer,
            versions=versions,
            counters={
                "updates_applied": applied,
                "rejected_pushes": rejected,
                "staleness_sum": staleness_sum,
                "staleness_max": staleness_max,
            },
        )

    def restore(self, state: ShardState) -> None:
        """Carry on from ``state`` (see :meth:`export_state`). Its optimizer state may be
        ``None`` (or miss a stage): that segment's update rule starts afresh. Counters, if
        given, are restored too; versions only ever come from ``state``, so staleness stays
        right after a restore."""
        if state.index != self.index:
            raise ValueError(
                f"restore: the state of shard {state.index} given to shard {self.index}"
            )
        if state.weights.numel() != sum(len(h.values) for h in self.held.values()):
            raise ValueError(
                f"restore: shard {self.index} holds "
                f"{sum(len(h.values) for h in self.held.values())} values, the state "
                f"{state.weights.numel()}"
            )
        offset = 0
        for stage, held in self.held.items():
            n = len(held.values)
            optimizer = (state.optimizer or {}).get(stage)
            if self._in_order:
                values = state.weights[offset : offset + n]
            else:
                values = torch.cat([state.weights[a:b] for a, b in held.positions])
            held.restore(values, int(state.versions.get(stage, 0)), optimizer)
            offset += n
        for i, key in enumerate(
            ("updates_applied", "rejected_pushes", "staleness_sum", "staleness_max")
        ):
            if key in state.counters:
                self._counts[i] = int(state.counters[key])

    @receives(Fetch)
    def on_fetch(self, msg: Fetch, sender: object) -> None:
        held = self.held[msg.stage]
        if msg.keep:  # a copy the stage keeps: made once, here
            with self._locked(msg.stage) if not self._hogwild else _UNLOCKED:
                values, version = held.values.clone(), held.version
        elif self._copies is None:
            held.readers.add(msg.replica)  # lent, not copied: see HeldSegment
            values, version = held.values, held.version
        else:  # shared memory: the stage's own copy, which only its next fetch changes
            values = self._copies.get((msg.replica, msg.stage))
            with self._locked(msg.stage) if not self._hogwild else _UNLOCKED:
                version = held.version
                if values is None:
                    values = self._copies[msg.replica, msg.stage] = held.values.clone()
                else:
                    values.copy_(held.values)
        self.ctx.tell(sender, FetchReply(self.index, values, version))

    @receives(Push)
    def on_push(self, msg: Push, sender: object) -> None:
        held = self.held[msg.stage]
        if msg.done_reading:
            held.readers.discard(msg.replica)
        ok = finite(msg.grads)  # the message alone: outside the lock
        counts = self._counts
        if not ok:
            with self._lock:
                counts[1] += 1  # a NaN/Inf push would poison every replica: drop it
            return
        segment = self._locked(msg.stage)
        with segment:
            # Clamped: a push fetched from a shard's earlier life may quote more than a
            # restore found (a copy newer than every copy left, lost with the shard).
            staleness = held.version - msg.fetched_version
            if staleness < 0:
                staleness = 0
            if self._hogwild:
                held.count_update()  # claimed here, applied below without the lock
            else:
                held.apply(msg.grads)
            with self._lock if segment is not self._lock else _UNLOCKED:
                counts[0] += 1
                counts[2] += staleness
                if staleness > counts[3]:
                    counts[3] = staleness
                self._staleness[min(staleness, STALENESS_BUCKETS - 1)] += 1
        if self._hogwild:
            held.step(msg.grads)

    @receives(Drain)
    def on_drain(self, msg: Drain, sender: object) -> None:
        # Per-sender FIFO: every push the stage sent before Drain has been handled.
        self.ctx.tell(sender, Drained(self.index))

    @receives(Snapshot)
    def on_snapshot(self, msg: Snapshot, sender: object) -> None:
        with self._all_locked():
            weights, stats = self.weights, self.stats()
        self.ctx.tell(sender, ShardSnapshot(self.index, msg.tag, weights, stats))

    @receives(CheckpointMark)
    def on_checkpoint_mark(self, msg: CheckpointMark, sender: object) -> None:
        self.ctx.tell(msg.reply_to, CheckpointMarked(msg.tag, self.index))

    @receives(CheckpointRequest)
    def on_checkpoint_request(self, msg: CheckpointRequest, sender: object) -> None:
        self.ctx.tell(sender, ShardStateReply(self.index, msg.tag, self.export_state()))

    @receives(StatsRequest)
    def on_stats_request(self, msg: StatsRequest, sender: object) -> None:
        with self._lock:
            stats = self.stats()
        self.ctx.tell(sender, ShardStats(self.index, stats))

    def stats(self) -> dict[str, Any]:
        """The shard's counters (a copy); a restarted shard not yet restored says
        ``awaiting_restore`` instead."""
        if self._held_back is not None:
            return {"awaiting_restore": True}
        applied, rejected, staleness_sum, staleness_max = (int(c) for c in self._counts)
        # (applied may be > 0 with an empty histogram: counters restored, histogram not)
        nonzero = self._staleness.nonzero()[0]
        used = int(nonzero.max()) + 1 if len(nonzero) else 0
        return {
            "updates_applied": applied,
            "rejected_pushes": rejected,
            "staleness_sum": staleness_sum,
            "staleness_max": staleness_max,
            "staleness_histogram": [int(c) for c in self._staleness[:used]],
        }
