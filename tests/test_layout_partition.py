"""The pure parts: flat layout, partitioning, data order."""

from __future__ import annotations

import random

import pytest
import torch
from support import mlp
from torch import nn

from distbelief.core.flat import bind_to_flat, flatten, load_flat
from distbelief.core.layout import MIN_PIECE, Layout, shard_ranges
from distbelief.core.partition import balanced_split_points, resolve_split_points
from distbelief.data.inputs import epoch_order, replica_ranges
from distbelief.errors import ConfigError


def test_shard_ranges_cover_everything_with_near_equal_sizes():
    ranges = shard_ranges(10, 3)
    assert ranges == ((0, 3), (3, 6), (6, 10))
    for total, shards in [(1, 1), (7, 7), (1000, 3), (76810, 4)]:
        r = shard_ranges(total, shards)
        assert r[0][0] == 0 and r[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
        sizes = [b - a for a, b in r]
        assert max(sizes) - min(sizes) <= 1


def test_shard_ranges_reject_more_shards_than_parameters():
    with pytest.raises(ValueError, match="3 parameters over 4 shards"):
        shard_ranges(3, 4)


def test_segments_are_exact_overlaps_and_a_stage_talks_only_to_its_shards():
    layout = Layout.build([6, 0, 10], shards=4)  # shards: 0-4, 4-8, 8-12, 12-16
    assert layout.segments_of_stage(0) == tuple(s for s in layout.segments if s.stage == 0)
    stage0 = [(s.shard, s.start, s.stop) for s in layout.segments_of_stage(0)]
    assert stage0 == [(0, 0, 4), (1, 4, 6)]
    assert layout.segments_of_stage(1) == ()
    assert [(s.shard, s.start, s.stop) for s in layout.segments_of_stage(2)] == [
        (1, 6, 8),
        (2, 8, 12),
        (3, 12, 16),
    ]
    # Segments tile the flat space exactly once.
    covered = sorted((s.start, s.stop) for s in layout.segments)
    assert covered[0][0] == 0 and covered[-1][1] == 16
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    assert [s.stage for s in layout.segments_of_shard(1)] == [0, 2]


def test_segments_split_into_pieces_at_large_tensors_and_merge_small_ones():
    big, small = MIN_PIECE, 100
    sizes = [big, small, small, 2 * big, small]  # all in one stage
    total = sum(sizes)
    b1, b2 = big + 2 * small, 3 * big + 2 * small  # ends of the small run and the large tensor
    (seg,) = Layout.build([total], shards=1, tensor_sizes=sizes).segments
    assert seg.pieces == ((0, big), (big, b1), (b1, b2), (b2, total))
    # Over two shards the large tensor straddles: its part in shard 0 is small (merged with the
    # small run), its part in shard 1 large (a piece of its own).
    half = total // 2
    assert b1 < half < b2 and half - b1 < MIN_PIECE <= b2 - half
    two = Layout.build([total], shards=2, tensor_sizes=sizes)
    assert [s.pieces for s in two.segments] == [((0, big), (big, half)), ((half, b2), (b2, total))]
    # A run of small tensors is cut once it reaches MIN_PIECE.
    runs = Layout.build([3 * (MIN_PIECE // 2)], shards=1, tensor_sizes=[MIN_PIECE // 2] * 3)
    assert runs.segments[0].pieces == ((0, MIN_PIECE), (MIN_PIECE, 3 * (MIN_PIECE // 2)))
    assert Layout.build([6], shards=1).segments[0].pieces == ((0, 6),)  # one tensor per stage
    with pytest.raises(ValueError, match="tensor sizes add up to 5, the stages to 6"):
        Layout.build([6], shards=1, tensor_sizes=[5])


def test_balanced_split_minimises_the_largest_stage():
    sizes = [10496, 0, 65792, 0, 2570]  # MLP 40-256-256-10
    points = balanced_split_points(sizes, 2)
    assert points == [2]  # [Linear, ReLU] | [Linear, ReLU, Linear]
    assert balanced_split_points(sizes, 5) == [1, 2, 3, 4]
    assert balanced_split_points([1, 1, 1, 1], 2) == [2]
    # Parameter-free layers stay with the layer before them.
    assert balanced_split_points([5, 0, 5, 0], 2) == [2]


def _exhaustive_split_points(sizes: list[int], stages: int) -> list[int]:
    """The reference, by trying every split into non-empty runs: the smallest largest run;
    among those, the latest start of the last stage (free layers stay with the layer before
    them); then the same rule for the stages before it, recursively. Small inputs only."""
    from itertools import combinations

    n = len(sizes)

    def key(points: tuple[int, ...]) -> list:
        bounds = [0, *points, n]
        runs = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
        out: list = []
        for k in range(len(points), 0, -1):  # the whole split, then each prefix of it
            out += [max(runs[: k + 1]), -points[k - 1]]
        return out

    return list(min(combinations(range(1, n), stages - 1), key=key))


def test_balanced_split_equals_an_exhaustive_search():
    rng = random.Random(1)
    for _ in range(3000):
        n = rng.randint(1, 9)
        sizes = [rng.choice([0, 0, 1, 2, 3, 5, 8, 100]) for _ in range(n)]
        stages = rng.randint(1, n)
        assert balanced_split_points(sizes, stages) == _exhaustive_split_points(sizes, stages), (
            sizes,
            stages,
        )


@pytest.mark.timeout(30)  # a bound, not a measurement: planning used to take minutes here
def test_planning_scales_to_thousands_of_shards_and_stages():
    rng = random.Random(0)
    sizes = [rng.choice([0, 10, 4096, 70_000]) for _ in range(1000)]  # a 1,000-layer model
    points = balanced_split_points(sizes, 100)
    assert len(points) == 99 and points == sorted(set(points))
    bounds = [0, *points, len(sizes)]
    stage_sizes = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
    layout = Layout.build(stage_sizes, 10_000, [n for n in sizes if n])
    by_shard = [layout.segments_of_shard(k) for k in range(10_000)]
    by_stage = [layout.segments_of_stage(s) for s in range(100)]
    # Every shard holds something, and the segments tile the flat space exactly once.
    assert all(by_shard)
    assert sum(len(s) for s in by_stage) == len(layout.segments) == sum(len(s) for s in by_shard)
    spans = [(seg.start, seg.stop) for seg in layout.segments]
    assert spans[0][0] == 0 and spans[-1][1] == layout.total
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_explicit_split_points_are_validated():
    assert resolve_split_points([1, 1, 1], [1, 2]) == [1, 2]
    for bad in ([0], [3], [2, 1], [1, 1], ["a"]):
        with pytest.raises(ConfigError, match="^stages"):
            resolve_split_points([1, 1, 1], bad)
    with pytest.raises(ConfigError, match="^stages: 4 stages but the model has only 3 layers"):
        resolve_split_points([1, 1, 1], 4)


def test_flat_binding_makes_parameters_views_of_one_buffer():
    model = mlp([3, 4, 2])
    before = flatten(model.children())
    weights = bind_to_flat(model.children(), torch.empty(0))
    assert torch.equal(weights, before)
    weights.add_(1.0)
    assert torch.equal(flatten(model.children()), before + 1)
    load_flat(model.children(), before)
    assert torch.equal(weights, before)
    other = torch.arange(before.numel(), dtype=torch.float32)
    assert bind_to_flat(model.children(), other) is other  # adopt a given buffer
    assert torch.equal(flatten(model.children()), other)
    with pytest.raises(ValueError, match="the layers need"):
        bind_to_flat(model.children(), torch.zeros(3))


def test_epoch_order_is_a_seeded_permutation_per_replica_and_epoch():
    a = epoch_order(100, seed=1, replica=0, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    assert torch.equal(a, epoch_order(100, seed=1, replica=0, epoch=0))
    assert not torch.equal(a, epoch_order(100, seed=1, replica=0, epoch=1))
    assert not torch.equal(a, epoch_order(100, seed=1, replica=1, epoch=0))
    assert not torch.equal(a, epoch_order(100, seed=2, replica=0, epoch=0))


def test_replica_ranges_split_like_the_seed():
    assert replica_ranges(50_000, 25)[3] == (6000, 8000)
    assert replica_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]


def test_model_with_shared_parameter_across_layers_is_rejected():
    from distbelief.core.partition import layer_sizes

    lin = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="^model: layers 0 and 1 share a parameter"):
        layer_sizes([lin, lin])
