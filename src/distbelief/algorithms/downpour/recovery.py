"""Recovering a restarted parameter shard: which source each of its segments comes from. Pure.

A shard that dies loses its slice. The newest copy of each segment is wherever its version
(updates applied to it) is highest: the last checkpoint, or a stage of some replica, which
keeps the values it fetched last with their version. :func:`choose` picks, per segment, the
newest source; the optimizer state comes with it only from a checkpoint (stages do not hold
it), else the update rule starts afresh. Versions never go down from what any stage quotes,
since the restored version is the highest any stage holds.

What is counted as lost: the updates the dead shard had applied beyond the restored versions,
as far as the master knows them: ``applied_known`` is the shard's ``updates_applied`` from its
last report to the master (it reports at every progress report), so ``lost_updates`` is a
lower bound: updates applied after that report and lost with the shard are not seen. Pushes
in flight to the dead shard are lost too and not counted here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...storage.checkpoint import ShardState


@dataclass(frozen=True)
class SegmentSource:
    """One candidate for a segment's values."""

    name: str
    """Where it comes from: ``replica<r>`` (a stage's copy), ``checkpoint`` or ``initial``."""
    values: torch.Tensor | None
    """The values (None for ``initial``: the restarted shard keeps its own)."""
    version: int
    """Updates applied to the segment in these values."""
    optimizer: Any = None
    """The update rule's state that goes with them (a checkpoint's), else None: fresh."""


@dataclass(frozen=True)
class Restore:
    """What to send a restarted shard (``messages.RestoreShard``), and the record of it."""

    values: dict[int, torch.Tensor]
    """Values per segment (by stage); a segment left out keeps the shard's initial values."""
    versions: dict[int, int]
    """Version per segment (by stage)."""
    optimizer: dict[int, Any]
    """Update-rule state per segment (by stage); left out: fresh."""
    record: dict[str, Any]
    """``actor``, ``restored_version`` (summed over segments), ``lost_updates``,
    ``applied_last_reported`` (the dead shard's ``updates_applied`` as last reported),
    ``optimizer`` (``checkpoint``, ``fresh`` or ``mixed``), ``source`` (``replica<r>``,
    ``checkpoint``, ``initial``, or several joined by ``+``), ``sources`` (by stage)."""


def split_checkpoint(
    state: ShardState,
    lengths: Mapping[int, int],
    positions: Mapping[int, tuple[tuple[int, int], ...]] | None = None,
) -> dict[int, SegmentSource]:
    """A checkpointed shard's slice cut into its segments (by stage, in position order, which
    is stage order; or, for partitions, whose ranges interleave, by owner at ``positions``:
    its ranges within the slice). Raises ValueError when the lengths do not tile the slice."""
    if sum(lengths.values()) != state.weights.numel():
        raise ValueError(
            f"the checkpoint of shard {state.index} holds {state.weights.numel()} values, "
            f"its segments {sum(lengths.values())}"
        )
    out, offset = {}, 0
    optimizer = state.optimizer or {}
    for stage in sorted(lengths):
        n = lengths[stage]
        values = state.weights[offset : offset + n]
        if positions is not None:
            values = torch.cat([state.weights[a:b] for a, b in positions[stage]])
        out[stage] = SegmentSource(
            "checkpoint",
            values,
            int(state.versions.get(stage, state.versions.get(str(stage), 0))),  # type: ignore[arg-type]
            optimizer.get(stage, optimizer.get(str(stage))),
        )
        offset += n
    return out


def choose(
    shard: int,
    lengths: Mapping[int, int],
    copies: Iterable[tuple[int, int, torch.Tensor | None, int]],
    checkpoint: Mapping[int, SegmentSource] | None = None,
    applied_known: int = 0,
) -> Restore:
    """Per segment of ``shard``, the newest of the stages' ``copies`` (``(replica, stage,
    values or None, version)``) and the ``checkpoint``'s segments (:func:`split_checkpoint`);
    on a tie the checkpoint wins (it has the optimizer state). A segment with neither keeps
    the shard's initial values at version 0. ``applied_known``: the dead shard's last
    reported ``updates_applied`` (see the module doc for what ``lost_updates`` counts)."""
    best: dict[int, SegmentSource] = {}
    for stage, source in (checkpoint or {}).items():
        if stage in lengths:
            best[stage] = source
    for replica, stage, values, version in copies:
        if values is None or stage not in lengths:
            continue
        if values.numel() != lengths[stage]:
            raise ValueError(
                f"replica {replica}'s stage {stage} holds {values.numel()} values of shard "
                f"{shard}'s segment of {lengths[stage]}"
            )
        current = best.get(stage)
        if current is None or version > current.version:
            best[stage] = SegmentSource(f"replica{replica}", values, version)
    sources = {s: best.get(s, SegmentSource("initial", None, 0)) for s in sorted(lengths)}
    restored = sum(src.version for src in sources.values())
    kinds = {"checkpoint" if src.optimizer is not None else "fresh" for src in sources.values()}
    record = {
        "actor": f"shard{shard}",
        "restored_version": restored,
        "lost_updates": max(0, applied_known - restored),
        "applied_last_reported": applied_known,
        "optimizer": kinds.pop() if len(kinds) == 1 else "mixed",
        "source": "+".join(sorted({src.name for src in sources.values()})),
        "sources": {s: src.name for s, src in sources.items()},
    }
    return Restore(
        values={s: src.values for s, src in sources.items() if src.values is not None},
        versions={s: src.version for s, src in sources.items()},
        optimizer={s: src.optimizer for s, src in sources.items() if src.optimizer is not None},
        record=record,
    )
