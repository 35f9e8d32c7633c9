"""The Downpour master's recovery of restarted parameter shards: it asks every stage for its
copy of the dead shard's segments, reads the newest checkpoint's slice of the shard, lets
``recovery.choose`` pick the newest source of each segment, and restores the shard.

A shard being recovered waits (``awaiting_restore``) until its ``RestoreShard`` comes; the
copies asked of a stage that is itself restarted meanwhile are asked of its new life.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...storage import checkpoint
from . import recovery
from .messages import CopyRequest, RestoreShard, SegmentCopy

Tell = Callable[[Any, Any], None]
"""How the owner sends a message to a ref (the master's ``ctx.tell``)."""

RESTORED_COUNTERS = ("rejected_pushes", "staleness_sum", "staleness_max")
"""The dead shard's counters, as last reported, that its restored life counts on from."""


@dataclass
class _Waiting:
    """One shard's recovery while the stages' copies come in."""

    pending: set[tuple[int, int]]  # (replica, stage) not answered yet
    copies: list[tuple[int, int, torch.Tensor | None, int]] = field(default_factory=list)
    lengths: dict[int, int] = field(default_factory=dict)  # stage -> segment length


def checkpoint_source(
    directory: str | None,
    shard: int,
    lengths: Mapping[int, int],
    positions: Mapping[int, tuple[tuple[int, int], ...]] | None = None,
) -> tuple[dict[int, recovery.SegmentSource] | None, Path | None, str | None]:
    """The newest checkpoint in ``directory`` as a source of ``shard``'s segments: its
    segments (None if there is no checkpoint or it does not serve), its path (None if there is
    none), and a note on why one found does not serve (else None)."""
    found = checkpoint.checkpoints(directory) if directory else []
    if not found:
        return None, None, None
    try:
        state = checkpoint.load(found[-1]).shards[shard]
        return recovery.split_checkpoint(state, lengths, positions), found[-1], None
    except (checkpoint.CheckpointError, ValueError, IndexError) as exc:
        return None, found[-1], f"checkpoint {found[-1]} not used: {exc}"  # copies still serve


class ShardRecovery:
    """Owned by the master: recovers each restarted parameter shard from the newest copies of
    its segments the replicas' stages hold, or the newest checkpoint in ``checkpoint_dir``
    where that is newer (see ``recovery``). ``reported`` is the master's latest
    ``ShardStats`` by shard, read when a restore is chosen (the dead shard's updates applied
    and counters as last reported). It sends through ``tell``. Each restore returns its
    record: ``recovery.Restore.record`` with the checkpoint's path, and a ``note`` when that
    checkpoint was not used."""

    def __init__(
        self,
        tell: Tell,
        checkpoint_dir: str | None,
        reported: Mapping[int, Mapping[str, Any]],
        positions: Mapping[int, Mapping[int, tuple[tuple[int, int], ...]]] | None = None,
    ) -> None:
        self.tell = tell
        # Partitions: per shard, each owner's ranges within its slice (they interleave).
        self.positions = positions
        self.checkpoint_dir = checkpoint_dir
        self.reported = reported
        self.waiting: dict[int, _Waiting] = {}  # shard -> copies awaited, got
        self.begun: set[int] = set()  # shards whose recovery began (in this master's life)
        self.shards: tuple = ()
        self.stages: tuple[tuple, ...] = ()  # stages[replica][stage]

    def connect(self, shards: tuple, stages: tuple[tuple, ...]) -> None:
        """The shards and the stages to ask for copies (``ConnectMaster``)."""
        self.shards, self.stages = shards, stages

    def begin(self, shard: int) -> None:
        """Ask every stage for its copy of ``shard``'s segments (answered by
        :meth:`on_copy`); :meth:`restore_if_complete` then restores at once if there are no
        stages to ask."""
        self.begun.add(shard)
        pending = {(r, s) for r, refs in enumerate(self.stages) for s in range(len(refs))}
        self.waiting[shard] = _Waiting(pending)
        for r, s in sorted(pending):
            self.tell(self.stages[r][s], CopyRequest(shard))

    def restore_if_complete(self, shard: int) -> dict[str, Any] | None:
        """Restore ``shard`` if every copy is in; returns the record of it, else None."""
        waiting = self.waiting.get(shard)
        if waiting is None or waiting.pending:
            return None
        return self._restore(shard)

    def on_copy(self, msg: SegmentCopy) -> dict[str, Any] | None:
        """A stage's copy of a segment (or its word that it holds none); with the last one in
        the shard is restored: returns the record of it, else None."""
        waiting = self.waiting.get(msg.shard)
        if waiting is None or (msg.replica, msg.stage) not in waiting.pending:
            return None
        waiting.pending.discard((msg.replica, msg.stage))
        if msg.length:
            waiting.lengths[msg.stage] = msg.length
            waiting.copies.append((msg.replica, msg.stage, msg.values, msg.version))
        return self.restore_if_complete(msg.shard)

    def on_stage_restarted(self, ref: Any) -> None:
        """A stage was restarted: a copy asked of its dead life is asked of the new one."""
        for shard, waiting in self.waiting.items():
            for r, s in waiting.pending:
                if self.stages[r][s] == ref:
                    self.tell(ref, CopyRequest(shard))

    def _restore(self, k: int) -> dict[str, Any]:
        """Every copy is in: restore shard ``k`` from the newest source of each segment."""
        waiting = self.waiting.pop(k)
        where = self.positions.get(k) if self.positions is not None else None
        saved, path, note = checkpoint_source(self.checkpoint_dir, k, waiting.lengths, where)
        stats = self.reported.get(k, {})
        restore = recovery.choose(
            k, waiting.lengths, waiting.copies, saved, int(stats.get("updates_applied", 0))
        )
        counters = {key: int(stats.get(key, 0)) for key in RESTORED_COUNTERS}
        self.tell(
            self.shards[k],
            RestoreShard(restore.values, restore.versions, restore.optimizer, counters),
        )
        record = {**restore.record, "checkpoint": str(path) if path is not None else None}
        if note:
            record["note"] = note
        return record
