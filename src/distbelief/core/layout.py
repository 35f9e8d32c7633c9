"""The flat parameter space: shard slices, stage ranges and their overlaps.

Every parameter of the model is laid end to end in one vector of ``total`` elements. PS shard
``k`` owns the contiguous slice ``shard_ranges[k]``; stage ``s`` owns the contiguous range
``stage_ranges[s]`` (its layers' parameters). A stage fetches and pushes exactly the
intersection of its range with each shard's slice: a *segment*.

A segment splits further into *pieces*, the unit a shard's optimizer steps and a push carries:
each tensor of at least ``MIN_PIECE`` elements is a piece of its own (a pushed gradient then
travels as the tensor autograd produced, and a stage reads lent values in place), and runs of
smaller tensors are merged (one concatenation costs less than a per-tensor overhead paid
several times a step). Everything here is pure.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

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
    pieces: tuple[Range, ...]
    """The segment's pieces (global coordinates, in order; see the module doc)."""

    @property
    def size(self) -> int:
        """Number of parameters in the segment."""
        return self.stop - self.start


MIN_PIECE = 4096
"""Tensors (or parts of tensors) with fewer elements are merged with their small neighbours
into pieces of about this size. Per piece and step a shard and a stage pay ~5 us of fixed
costs (an optimizer loop turn, a finiteness reduction, re-pointing a parameter); copying an
element through a concatenation costs ~1.5 ns: they break even near 4,000 elements."""


def pieces(start: int, stop: int, tensors: tuple[Range, ...]) -> tuple[Range, ...]:
    """Split ``[start, stop)`` into pieces: each overlap with a tensor of ``tensors`` of at
    least ``MIN_PIECE`` elements alone, runs of smaller overlaps merged up to that size."""
    out: list[Range] = []
    run: Range | None = None  # small overlaps merged so far
    for lo, hi in overlaps(start, stop, tensors):
        if hi - lo >= MIN_PIECE:
            if run is not None:
                out.append(run)
                run = None
            out.append((lo, hi))
            continue
        run = (run[0] if run is not None else lo, hi)
        if run[1] - run[0] >= MIN_PIECE:
            out.append(run)
            run = None
    if run is not None:
        out.append(run)
    return tuple(out)


def overlaps(start: int, stop: int, ranges: tuple[Range, ...]) -> tuple[Range, ...]:
    """The non-empty intersections of ``[start, stop)`` with each of ``ranges``, in order.

    ``ranges`` are sorted and disjoint (shard slices, tensor ranges): a binary search finds the
    first one that can overlap, so a model of thousands of tensors over thousands of shards
    plans in time proportional to the overlaps, not to their product.
    """
    out = []
    first = bisect.bisect_right(ranges, start, key=lambda r: r[1])  # first range ending > start
    for a, b in ranges[first:]:
        if a >= stop:
            break
        lo, hi = max(start, a), min(stop, b)
        if lo < hi:
            out.append((lo, hi))
    return tuple(out)


def segments_of_ranges(
    owner: int,
    ranges: Sequence[Range],
    shard_ranges: tuple[Range, ...],
    tensor_ranges: tuple[Range, ...] = (),
) -> tuple[Segment, ...]:
    """The segments an owner of several disjoint ranges fetches and pushes: each range's overlap
    with each shard's slice, in position order (``Segment.stage`` is ``owner``).

    A stage owns one range; a partition (a block of units through a stage's layers, see
    ``core/blocks.py``) owns one per layer. Pieces as in :func:`pieces` when ``tensor_ranges``
    are given, else each segment is one piece.
    """
    out = []
    for start, stop in sorted(ranges):
        first = bisect.bisect_right(shard_ranges, start, key=lambda r: r[1])  # as in overlaps
        for k in range(first, len(shard_ranges)):
            lo, hi = shard_ranges[k]
            if lo >= stop:
                break
            lo, hi = max(start, lo), min(stop, hi)
            if lo < hi:
                cut = pieces(lo, hi, tensor_ranges) if tensor_ranges else ((lo, hi),)
                out.append(Segment(owner, k, lo, hi, cut))
    return tuple(out)


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
    tensor_ranges: tuple[Range, ...]
    """Range of each model tensor (parameter), in layout order."""

    @classmethod
    def build(
        cls, stage_sizes: list[int], shards: int, tensor_sizes: list[int] | None = None
    ) -> Layout:
        """Layout for stages of the given parameter counts over ``shards`` shards.

        ``tensor_sizes`` are the element counts of the model's parameters in layout order
        (they must add up to the stages' total); without them each stage is one tensor.
        """
        total = sum(stage_sizes)
        sizes = [n for n in (stage_sizes if tensor_sizes is None else tensor_sizes) if n]
        if sum(sizes) != total:
            raise ValueError(f"tensor sizes add up to {sum(sizes)}, the stages to {total}")
        slices = shard_ranges(total, shards)
        return cls(total, slices, stage_ranges(stage_sizes), stage_ranges(sizes))

    @cached_property
    def segments(self) -> tuple[Segment, ...]:
        """All non-empty stage/shard overlaps, ordered by position (computed once)."""
        out = []
        first_shard = 0  # stages and shards both run left to right: resume where the last ended
        for s, (a, b) in enumerate(self.stage_ranges):
            for k in range(first_shard, len(self.shard_ranges)):
                lo, hi = self.shard_ranges[k]
                if lo >= b:
                    break
                lo, hi = max(a, lo), min(b, hi)
                if lo < hi:
                    out.append(Segment(s, k, lo, hi, pieces(lo, hi, self.tensor_ranges)))
                    first_shard = k
        return tuple(out)

    @cached_property
    def _by_stage(self) -> dict[int, tuple[Segment, ...]]:
        return _group(self.segments, "stage")

    @cached_property
    def _by_shard(self) -> dict[int, tuple[Segment, ...]]:
        return _group(self.segments, "shard")

    def segments_of_stage(self, stage: int) -> tuple[Segment, ...]:
        """The segments a stage fetches and pushes; it talks to no other shard."""
        return self._by_stage.get(stage, ())

    def segments_of_shard(self, shard: int) -> tuple[Segment, ...]:
        """The segments a shard holds, one per stage whose range overlaps its slice."""
        return self._by_shard.get(shard, ())

    def segments_of_ranges(self, owner: int, ranges: Sequence[Range]) -> tuple[Segment, ...]:
        """The segments an owner of several ranges (a partition) fetches and pushes, cut into
        pieces as a stage's are (see :func:`segments_of_ranges`)."""
        return segments_of_ranges(owner, ranges, self.shard_ranges, self.tensor_ranges)


def _group(segments: tuple[Segment, ...], key: str) -> dict[int, tuple[Segment, ...]]:
    """Segments grouped by their stage or shard, each group in position order."""
    groups: dict[int, list[Segment]] = {}
    for seg in segments:
        groups.setdefault(getattr(seg, key), []).append(seg)
    return {k: tuple(v) for k, v in groups.items()}
