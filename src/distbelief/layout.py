"""The flat parameter space: shard slices, stage ranges and their overlaps.

Every parameter of the model is laid end to end in one vector of ``total`` elements. PS shard
``k`` owns the contiguous slice ``shard_ranges[k]``; stage ``s`` owns the contiguous range
``stage_ranges[s]`` (its layers' parameters). A stage fetches and pushes exactly the
intersection of its range with each shard's slice: a *segment*. Everything here is pure.
"""

from __future__ import annotations

from dataclasses import dataclass

Range = tuple[int, int]
"""A half-open ``[start, stop)`` range of positions in the flat parameter space."""


@dataclass(frozen=True, slots=True)
class Segment:
    """The overlap of one stage's range with one shard's slice (global coordinates)."""

    stage: int
    """Index of the stage whose parameters these are."""
    shard: int
    """Index of the PS shard that holds them."""
    start: int
    """First position in the flat parameter space."""
    stop: int
    """One past the last position in the flat parameter space."""

    @property
    def size(self) -> int:
        """Number of parameters in the segment."""
        return self.stop - self.start


def shard_ranges(total: int, shards: int) -> tuple[Range, ...]:
    """Split ``total`` positions into ``shards`` contiguous slices whose sizes differ by <= 1.

    A tensor may straddle two shards: the split ignores tensor boundaries on purpose, so the
    load is balanced however uneven the layers are.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if total < shards:
        raise ValueError(f"cannot split {total} parameters over {shards} shards")
    bounds = [k * total // shards for k in range(shards + 1)]
    return tuple((bounds[k], bounds[k + 1]) for k in range(shards))


def stage_ranges(stage_sizes: list[int]) -> tuple[Range, ...]:
    """Lay stages end to end: stage ``s`` gets ``stage_sizes[s]`` consecutive positions."""
    ranges = []
    start = 0
    for size in stage_sizes:
        ranges.append((start, start + size))
        start += size
    return tuple(ranges)


@dataclass(frozen=True)
class Layout:
    """Where every parameter lives: which shard holds it and which stage uses it."""

    total: int
    """Number of parameters in the model."""
    shard_ranges: tuple[Range, ...]
    """Slice of the flat space held by each PS shard."""
    stage_ranges: tuple[Range, ...]
    """Range of the flat space used by each stage."""

    @classmethod
    def build(cls, stage_sizes: list[int], shards: int) -> Layout:
        """Layout for stages of the given parameter counts over ``shards`` shards."""
        total = sum(stage_sizes)
        return cls(total, shard_ranges(total, shards), stage_ranges(stage_sizes))

    @property
    def segments(self) -> tuple[Segment, ...]:
        """All non-empty stage/shard overlaps, ordered by position."""
        out = []
        for s, (a, b) in enumerate(self.stage_ranges):
            for k, (c, d) in enumerate(self.shard_ranges):
                lo, hi = max(a, c), min(b, d)
                if lo < hi:
                    out.append(Segment(s, k, lo, hi))
        return tuple(out)

    def segments_of_stage(self, stage: int) -> tuple[Segment, ...]:
        """The segments a stage fetches and pushes; it talks to no other shard."""
        return tuple(seg for seg in self.segments if seg.stage == stage)

    def segments_of_shard(self, shard: int) -> tuple[Segment, ...]:
        """The segments a shard holds, one per stage whose range overlaps its slice."""
        return tuple(seg for seg in self.segments if seg.shard == shard)
