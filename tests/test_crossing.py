"""``core.blocks.crossing_bytes``: the bytes that cross between a stage's blocks per training
step, counted from the plan. Oracle: the tensors the blocks actually hand each other when
``run_blocks`` runs the stage (forward pieces and backward gradients between different blocks).
And the paper's Figure 3 finding, as counts: a locally-connected net's bytes grow with the
number of boundaries (P - 1) times a halo, independent of the layers' length; a fully connected
net's with its width times P - 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distbelief.bench import model_parallel as mp
from distbelief.core import blocks
from distbelief.core.blocks import crossing_bytes, plan_split, run_blocks
from distbelief.core.partition import as_layers, layer_sizes, resolve_split_points
from distbelief.errors import ConfigError
from distbelief.models import mlp, mnist1d_local
from distbelief.nn import LocallyConnected1d, LocallyConnected2d

BATCH = 4


def lc_stack(length: int, channels: int = 3, layers: int = 3) -> list[nn.Module]:
    """Kernel-3, stride-1, padding-1 locally-connected layers at full ``length``."""
    out: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    for i in range(layers):
        out += [LocallyConnected1d(1 if i == 0 else channels, channels, 3, length, padding=1)]
        out += [nn.ReLU()]
    return out


def exchanged_bytes(layers: list[nn.Module], plan: blocks.StagePlan, in_shape, batch: int) -> int:
    """Run the stage block by block and add up the bytes of every tensor one block hands
    another (forward: ``pieces_to_send``; backward: ``grads_to_return``)."""
    sent = 0
    send, back = blocks.pieces_to_send, blocks.grads_to_return

    def count(pairs):
        nonlocal sent
        sent += sum(v.numel() * v.element_size() for t, v in pairs if t.src != t.dst)
        return pairs

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(blocks, "pieces_to_send", lambda *a: count(send(*a)))
        mp_.setattr(blocks, "grads_to_return", lambda *a: count(back(*a)))
        x = torch.randn(batch, *in_shape)
        out = nn.Sequential(*layers)(x)
        run_blocks(plan, layers, x, torch.randn_like(out))
    return sent


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "make, in_shape",
    [
        (lambda: mlp((6, 10, 7, 5)), (6,)),
        (lambda: lc_stack(11), (11,)),
        (lambda: list(mnist1d_local(channels=(4, 4, 4))), (40,)),
        (
            lambda: [
                LocallyConnected2d(2, 3, 3, (9, 6), stride=(2, 1), padding=1),
                nn.Tanh(),
                nn.Flatten(),
                nn.Linear(3 * 5 * 6, 8),
            ],
            (2, 9, 6),
        ),  # fmt: skip
    ],
)
def test_crossing_bytes_are_what_the_blocks_hand_each_other(make, in_shape, parts):
    torch.manual_seed(0)
    layers = make()
    plan = plan_split(layers, parts, in_shape)
    counted = crossing_bytes(plan, BATCH)
    assert counted == exchanged_bytes(layers, plan, in_shape, BATCH)
    assert (counted == 0) == (parts == 1)


def test_crossing_bytes_scale_with_batch_and_dtype():
    plan = plan_split(mlp((6, 10, 7, 5)), 2, (6,))
    one = crossing_bytes(plan, 1)
    assert one == 2 * plan.crossing_elements() * 4  # forward values and backward gradients
    assert crossing_bytes(plan, 32) == 32 * one
    assert crossing_bytes(plan, 32, torch.float64) == 64 * one
    assert crossing_bytes(plan, 32, torch.bfloat16) == 16 * one


@pytest.mark.parametrize("batch", [0, -1, 2.0, True])
def test_crossing_bytes_refuse_a_bad_batch(batch):
    plan = plan_split(mlp((6, 10, 5)), 2, (6,))
    with pytest.raises(ConfigError, match="batch: must be an integer >= 1"):
        crossing_bytes(plan, batch)


def per_boundary(layers: list[nn.Module], in_shape, parts) -> list[float]:
    return [crossing_bytes(plan_split(layers, p, in_shape), 1) / (p - 1) for p in parts]


def test_locally_connected_bytes_grow_with_the_boundaries_not_the_length():
    parts = [2, 4, 8, 16]
    short, long = (
        per_boundary(lc_stack(40), (40,), parts),
        per_boundary(lc_stack(160), (160,), parts),
    )
    # One halo position each way per boundary for each layer after the first (3 channels):
    # 2 layers x 2 positions x 3 channels, forward and back, 4 bytes.
    assert short == long == [2 * 2 * 3 * 2 * 4] * len(parts)


def test_fully_connected_bytes_grow_with_width_times_partitions():
    parts = [2, 4, 8, 16]
    for width in (32, 64):
        # every Linear after the first gathers its whole input: width x (P - 1) per layer
        expected = 2 * 4 * 3 * width
        assert per_boundary(mlp((40, width, width, width, 16)), (40,), parts) == [expected] * 4


def test_benchmark_nets_bytes_as_the_paper_finds():
    for width in (64, 512):
        figures = mp.counted(width)
        fc, lc = (figures[n] for n in mp.NETS)
        assert 0.9 < lc["parameters"] / fc["parameters"] < 1.1  # about the same size
        fc_b = {int(p): b for p, b in fc["bytes_per_step"].items()}
        lc_b = {int(p): b for p, b in lc["bytes_per_step"].items()}
        assert list(fc_b) == list(lc_b) == list(mp.COUNTED_PARTS) and fc_b[1] == lc_b[1] == 0
        # fully connected: the three W-wide inputs and the classifier's, x (P - 1)
        assert all(fc_b[p] == 2 * 4 * mp.BATCH * 4 * width * (p - 1) for p in fc_b)
        # locally connected: a halo of C channels each side of each boundary in four layers,
        # and the classifier's 80 inputs, x (P - 1): nothing grows with the length
        c = mp.lc_channels(width)
        assert all(lc_b[p] == 2 * 4 * mp.BATCH * (4 * 2 * c + 80) * (p - 1) for p in lc_b)
        assert all(lc_b[p] < fc_b[p] for p in mp.COUNTED_PARTS[1:])


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("parts", [2, 4])
def test_the_mnist1d_local_net_splits_at_every_stage_cut(stages, parts):
    model = mnist1d_local()
    layers = as_layers(model)
    points = resolve_split_points(layer_sizes(layers), stages)
    x = torch.zeros(2, 40)
    for lo, hi in zip([0, *points], [*points, len(layers)]):
        plan = plan_split(layers[lo:hi], parts, tuple(x.shape[1:]))
        assert plan.parts == parts
        x = nn.Sequential(*layers[lo:hi])(x)
    assert x.shape == (2, 10)
