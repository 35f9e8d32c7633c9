"""Sandblaster's portions: which examples a portion holds, and who computes which (pure).

A batch (the whole training set, or a fresh mini-batch per L-BFGS step) is cut into ``P``
contiguous portions. :class:`PortionBook` hands them out one at a time to whichever replica is
free: first the portions of the replica's own contiguous part of the batch (data affinity),
then portions taken from the part with the most left, then - near the end, when nothing is
left to hand out - *backup* copies of portions still being computed elsewhere. The first
result for a portion counts; a later one is dropped, so every example counts exactly once.
"""

from __future__ import annotations

from collections import deque

import torch

from ...data.inputs import epoch_order, replica_ranges


def batch_size_of(n: int, batch_size: int | None) -> int:
    """Examples per batch: all ``n`` when ``batch_size`` is None."""
    return n if batch_size is None else min(batch_size, n)


def batch_indices(n: int, batch_size: int | None, seed: int, batch: int) -> torch.Tensor | None:
    """The examples of a batch: None for the whole set (batch 0, in order); otherwise the
    ``batch``-th mini-batch of seeded epochs over the ``n`` examples (the remainder of an epoch
    that does not fill a batch is skipped)."""
    if batch_size is None or batch_size >= n:
        return None
    per_epoch = n // batch_size
    epoch, k = divmod(batch, per_epoch)
    return epoch_order(n, seed, 0, epoch)[k * batch_size : (k + 1) * batch_size]


def portion_range(batch_examples: int, portions: int, portion: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` within the batch of portion ``portion`` of ``portions``."""
    return portion * batch_examples // portions, (portion + 1) * batch_examples // portions


class PortionBook:
    """Who computes which portion of one function evaluation. Steppable and pure.

    ``backup``: hand idle replicas copies of outstanding portions (at most one backup copy
    each). ``duplicate_all``: hand every portion to two replicas (tests of exactly-once).
    """

    def __init__(
        self, portions: int, replicas: int, backup: bool = True, duplicate_all: bool = False
    ) -> None:
        self.portions = portions
        self.backup = backup or duplicate_all
        self.duplicate_all = duplicate_all
        # Data affinity: replica r's own portions are the r-th contiguous group.
        self.unassigned = [deque(range(lo, hi)) for lo, hi in replica_ranges(portions, replicas)]
        self.left = portions  # portions in ``unassigned`` (spares a scan of 2,000 groups)
        self.pending: dict[int, list[int]] = {}  # portion -> replicas computing it now
        self.handed: dict[int, list[int]] = {}  # portion -> every replica it was handed to
        self.winner: dict[int, int] = {}  # portion -> replica whose result counted
        self.busy: dict[int, int] = {}  # replica -> the portion it is computing
        self.counted: dict[int, int] = {}  # replica -> portions whose counted result is its
        # Portions with a copy being computed and no counted result, in the order of
        # ``pending`` (the order they were first handed out): the backups' candidates.
        self.open: dict[int, None] = {}
        self.backups_handed = 0
        self.backup_wins = 0

    @property
    def done(self) -> bool:
        """Every portion has a counted result."""
        return len(self.winner) == self.portions

    def outstanding(self) -> list[int]:
        """Portions being computed and not yet done, oldest first."""
        return [p for p in self.open if self.pending[p]]

    def next_for(self, replica: int) -> tuple[int, bool] | None:
        """The portion to hand ``replica`` (which must be free) and whether it is a backup
        copy; None when there is nothing for it."""
        if self.duplicate_all:
            for p, who in self.handed.items():
                if len(who) == 1 and who[0] != replica:
                    return self._hand(replica, p)
        own = self.unassigned[replica] if replica < len(self.unassigned) else deque()
        if own:
            self.left -= 1
            return self._hand(replica, own.popleft())
        if self.left:
            fullest = max(self.unassigned, key=len)
            self.left -= 1
            return self._hand(replica, fullest.pop())  # from the end: the owner keeps its front
        if self.backup:
            for p in self.open:
                who = self.pending[p]
                if who and len(who) < 2 and replica not in who:
                    return self._hand(replica, p)
        return None

    def _hand(self, replica: int, portion: int) -> tuple[int, bool]:
        is_backup = bool(self.pending.get(portion)) or portion in self.winner
        if portion not in self.pending and portion not in self.winner:
            self.open[portion] = None
        self.pending.setdefault(portion, []).append(replica)
        self.handed.setdefault(portion, []).append(replica)
        self.busy[replica] = portion
        if is_backup:
            self.backups_handed += 1
        return portion, is_backup

    def complete(self, replica: int, portion: int) -> bool:
        """``replica`` finished ``portion``: True if its result counts (the first one)."""
        if self.busy.get(replica) == portion:
            del self.busy[replica]
        who = self.pending.get(portion, [])
        if replica not in who:
            return False  # not (or no longer) its portion: lost and handed out again
        who.remove(replica)
        if portion in self.winner:
            return False
        self.winner[portion] = replica
        self.counted[replica] = self.counted.get(replica, 0) + 1
        self.open.pop(portion, None)
        if self.handed[portion][0] != replica:
            self.backup_wins += 1
        return True

    def lost(self, replica: int) -> list[int]:
        """``replica`` died: what it computed no longer counts (its sums may not have reached
        the shards). Returns the portions handed out again (not those another replica is
        still computing)."""
        self.busy.pop(replica, None)
        again = []
        for p, who in self.pending.items():
            if replica in who:
                who.remove(replica)
            if self.winner.get(p) == replica:
                del self.winner[p]
                self.counted[replica] -= 1
            if p not in self.winner and not who and replica in self.handed[p]:
                again.append(p)
        for p in again:
            del self.pending[p]
            self.handed[p] = [r for r in self.handed[p] if r != replica] or []
            if not self.handed[p]:
                del self.handed[p]
            self._requeue(p)
        # (rare: a death) the candidates again in the order of ``pending``
        self.open = {p: None for p in self.pending if p not in self.winner}
        return again

    def _requeue(self, portion: int) -> None:
        # Back into the group it came from, so data affinity still holds for it.
        groups = replica_ranges(self.portions, len(self.unassigned))
        for group, (lo, hi) in zip(self.unassigned, groups, strict=True):
            if lo <= portion < hi:
                group.append(portion)
                ordered = sorted(group)
                group.clear()
                group.extend(ordered)
                self.left += 1
                return

    def counted_by(self, replica: int) -> int:
        """Portions whose counted result is ``replica``'s."""
        return self.counted.get(replica, 0)
