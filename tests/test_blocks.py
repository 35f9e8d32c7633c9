"""``core/blocks.py``: a stage's layers cut into P blocks of units. Oracle: the unsplit layers in
plain torch. The blocks' outputs assembled, their input gradients summed and their parameter
gradients placed in their ranges equal the unsplit forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distbelief.core import blocks
from distbelief.core.blocks import plan_split, run_blocks, split_units
from distbelief.core.layout import Layout, segments_of_ranges
from distbelief.errors import ConfigError
from distbelief.nn import LocallyConnected1d, LocallyConnected2d

PARTS = [1, 2, 3, 4]


def flat_grads(layers: list[nn.Module]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for m in layers for p in m.parameters()])


def check_against_unsplit(
    layers: list[nn.Module], parts: int, in_shape: tuple[int, ...], batch: int = 3
) -> blocks.StagePlan:
    """Run the stage unsplit and in ``parts`` blocks; everything must agree to 1e-6."""
    torch.manual_seed(parts)
    dtype = next(p for m in layers for p in m.parameters()).dtype
    x = torch.randn(batch, *in_shape, dtype=dtype, requires_grad=True)
    out = nn.Sequential(*layers)(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    plan = plan_split(layers, parts, in_shape)
    run = run_blocks(plan, layers, x.detach(), grad_out)
    torch.testing.assert_close(run.output, out.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(run.input_grad, x.grad, atol=1e-6, rtol=0)
    # Each block's parameter gradients, laid in its ranges, fill the unsplit flat gradient.
    expected = flat_grads(layers)
    placed = torch.full_like(expected, float("nan"))
    for ranges, grads in zip(plan.block_ranges(), run.param_grads):
        values = torch.cat([g.reshape(-1) for g in grads])
        at = torch.cat([torch.arange(lo, hi) for lo, hi in ranges])
        assert len(at) == len(values)
        placed[at] = values
    torch.testing.assert_close(placed, expected, atol=1e-6, rtol=0)
    return plan


def f64(*layers: nn.Module) -> list[nn.Module]:
    torch.manual_seed(0)
    return [m.double() for m in layers]


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("n_in, n_out", [(5, 4), (7, 9), (3, 13)])
def test_linear_split_by_output_units(parts, n_in, n_out):
    check_against_unsplit(f64(nn.Linear(n_in, n_out)), parts, (n_in,))


@pytest.mark.parametrize("parts", PARTS)
def test_linear_on_more_dimensions_and_without_bias(parts):
    check_against_unsplit(f64(nn.Linear(6, 7, bias=False)), parts, (2, 6))


# (kernel, stride, padding, length): sizes that do not divide evenly among them
LOCAL_1D = [(3, 1, 1, 10), (3, 2, 1, 11), (5, 3, 2, 13), (4, 2, 0, 11), (1, 1, 0, 7), (6, 1, 3, 7)]


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("kernel, stride, padding, length", LOCAL_1D)
def test_locally_connected_1d_split_by_output_position(parts, kernel, stride, padding, length):
    layer = LocallyConnected1d(2, 3, kernel, length, stride, padding)
    assert layer.out_length >= parts  # (fewer positions than parts: the error case, below)
    check_against_unsplit(f64(layer), parts, (2, length))


LOCAL_2D = [
    ((3, 3), (1, 1), (1, 1), (6, 5)),
    ((3, 2), (2, 1), (1, 0), (9, 5)),
    ((2, 4), (3, 2), (0, 2), (12, 6)),
    ((5, 1), (1, 1), (2, 0), (4, 3)),
]


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("kernel, stride, padding, size", LOCAL_2D)
def test_locally_connected_2d_split_by_output_rows(parts, kernel, stride, padding, size):
    layer = LocallyConnected2d(2, 3, kernel, size, stride, padding)
    check_against_unsplit(f64(layer), parts, (2, *size))


# Stacks: the blocks exchange pieces between layers (halos, all-to-all), through reshapes.
STACKS = {
    "linear-relu-linear": (lambda: [nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5)], (6,)),
    "lc1d-relu-lc1d-flatten": (
        lambda: [LocallyConnected1d(2, 3, 3, 13, 1, 1), nn.ReLU(),
                 LocallyConnected1d(3, 2, 4, 13, 2, 1), nn.Flatten()],
        (2, 13),
    ),
    "unflatten-lc1d-tanh-lc1d-flatten-linear": (
        lambda: [nn.Unflatten(1, (1, 20)), LocallyConnected1d(1, 3, 5, 20, 2, 2), nn.Tanh(),
                 LocallyConnected1d(3, 4, 3, 10, 1, 1), nn.Sigmoid(), nn.Flatten(),
                 nn.Linear(40, 7), nn.ReLU(), nn.Linear(7, 4)],
        (20,),
    ),
    "lc2d-relu-lc2d-flatten-linear": (
        lambda: [LocallyConnected2d(1, 2, 3, (9, 6), 1, 1), nn.ReLU(),
                 LocallyConnected2d(2, 2, (3, 2), (9, 6), (2, 1), (1, 0)), nn.Flatten(),
                 nn.Linear(2 * 5 * 5, 5)],
        (1, 9, 6),
    ),
    # a reshape round trip keeps the halo exchange; Linear -> Unflatten -> LC gathers all
    "lc1d-flatten-unflatten-lc1d": (
        lambda: [LocallyConnected1d(2, 2, 3, 11, 1, 1), nn.Flatten(), nn.Unflatten(1, (2, 11)),
                 LocallyConnected1d(2, 1, 3, 11, 1, 0)],
        (2, 11),
    ),
    "linear-unflatten-lc1d": (
        lambda: [nn.Linear(5, 24), nn.Unflatten(1, (2, 12)), nn.ReLU(),
                 LocallyConnected1d(2, 3, 3, 12, 2, 1)],
        (5,),
    ),
}  # fmt: skip


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_a_split_stack_equals_the_unsplit_stack(stack, parts):
    make, in_shape = STACKS[stack]
    check_against_unsplit(f64(*make()), parts, in_shape)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_a_split_stack_in_float32_too(stack, parts):
    torch.manual_seed(0)
    make, in_shape = STACKS[stack]
    check_against_unsplit(make(), parts, in_shape)


def test_halo_and_all_to_all_transfers():
    # 12 positions, kernel 3, padding 1: each block needs one position from each neighbour.
    layers = [LocallyConnected1d(1, 1, 3, 12, 1, 1), LocallyConnected1d(1, 1, 3, 12, 1, 1)]
    plan = plan_split(layers, 3, (1, 12))
    second = plan.layers[1]
    assert second.needs == ((0, 5), (3, 9), (7, 12))
    assert second.pads == ((1, 0), (0, 0), (0, 1))
    halo = {(t.src, t.dst, t.start, t.stop) for t in second.transfers if t.src != t.dst}
    assert halo == {(1, 0, 4, 5), (0, 1, 3, 4), (2, 1, 8, 9), (1, 2, 7, 8)}
    assert plan.crossing_elements() == 4
    assert plan.layers[0].transfers == ()  # the stage's input: every block has it all
    # A Linear's blocks each need the whole input: every piece goes to every other block.
    mlp = plan_split([nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 4)], 3, (4,))
    assert mlp.crossing_elements() == 12 * 2  # each of 3 blocks gets the other 8 units


def test_an_input_piece_no_block_reads_gets_a_zero_gradient():
    layers = [LocallyConnected1d(1, 1, 1, 12), LocallyConnected1d(1, 1, 1, 12, stride=5)]
    plan = plan_split(layers, 2, (1, 12))
    # Block 1 of the second layer reads positions 5 and 10 (its strip is 5..10); it owns 6..11,
    # and position 11 is read by no block.
    second = plan.layers[1]
    piece = torch.ones(2, 1, 6)
    returned = [(t, torch.ones(2, 1, t.stop - t.start)) for t in second.transfers if t.src == 1]
    grad = blocks.own_grad(second, 1, piece, returned)
    assert grad[0, 0].tolist() == [1, 1, 1, 1, 1, 0]
    assert blocks.own_grad(second, 1, piece, []).abs().sum() == 0


def test_stage_input_layers_run_whole_and_follow_layers_follow():
    plan = plan_split([nn.Unflatten(1, (1, 8)), LocallyConnected1d(1, 2, 3, 8), nn.ReLU()], 2, (8,))
    assert [lp.kind for lp in plan.layers] == ["whole", "local1d", "follow"]
    assert plan.output.ranges == ((0, 3), (3, 6))


def test_split_units_even_and_errors():
    assert split_units(10, 3) == ((0, 3), (3, 6), (6, 10))
    assert split_units(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert split_units(7, 1) == ((0, 7),)
    for n, p in ((10, 3), (101, 7), (5, 5)):
        sizes = [hi - lo for lo, hi in split_units(n, p)]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError, match=r"partitions: must be an integer >= 1, got 0"):
        split_units(5, 0)
    with pytest.raises(
        ConfigError, match=r"partitions: 6 partitions but the layer has only 5 units"
    ):
        split_units(5, 6)


@pytest.mark.parametrize(
    "layers, in_shape, parts, message",
    [
        ([nn.Linear(4, 3)], (4,), 4, r"partitions: 4 partitions but layer 0 \(Linear\) has only "
         r"3 output units"),
        ([nn.Linear(4, 8), nn.Unflatten(1, (2, 4)), LocallyConnected1d(2, 1, 3, 4)], (4,), 3,
         r"layer 2 \(LocallyConnected1d\) has only 2 output positions"),
        ([nn.Linear(4, 8), LocallyConnected1d(2, 1, 3, 4)], (4,), 2,
         r"layer 1 \(LocallyConnected1d\) takes inputs of shape \(N, 2, 4\), the layers before "
         r"it give \(N, 8\)"),
        ([LocallyConnected2d(1, 1, 3, (4, 9))], (1, 4, 9), 3, r"has only 2 output rows"),
        ([nn.Linear(4, 8)], (4,), 0, r"partitions: must be an integer >= 1, got 0"),
        ([nn.Linear(4, 8), nn.Conv1d(1, 1, 3)], (4,), 2,
         r"partitions: layer 1 \(Conv1d\) cannot be split into blocks"),
        ([nn.LSTM(4, 4)], (4,), 2, r"layer 0 \(LSTM\) cannot be split"),
        ([nn.Linear(4, 8), nn.Softmax(dim=1)], (4,), 2, r"layer 1 \(Softmax\) cannot be split"),
        ([nn.ReLU(), nn.Flatten()], (4,), 2, r"the stage's layers \(ReLU, Flatten\) have no "
         r"units to split"),
        ([nn.Linear(5, 8)], (4,), 2, r"layer 0 \(Linear\) takes inputs of shape \(N, 5\), the "
         r"layers before it give \(N, 4\)"),
        ([nn.Linear(4, 8), nn.Flatten(0)], (4,), 2, r"layer 1 \(Flatten\) reshapes dimension 0"),
    ],
)  # fmt: skip
def test_what_cannot_be_split_is_a_config_error_naming_it(layers, in_shape, parts, message):
    with pytest.raises(ConfigError, match=message):
        plan_split(layers, parts, in_shape)


@pytest.mark.parametrize("parts", PARTS)
def test_the_blocks_ranges_partition_the_stage_range(parts):
    make, in_shape = STACKS["unflatten-lc1d-tanh-lc1d-flatten-linear"]
    layers = make()
    plan = plan_split(layers, parts, in_shape)
    start = 1000
    total = sum(p.numel() for m in layers for p in m.parameters())
    ranges = [r for block in plan.block_ranges(start) for r in block]
    covered = sorted(ranges)
    assert covered[0][0] == start and covered[-1][1] == start + total
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap
    # Per layer with parameters, a block owns a slice of each tensor (merged when adjacent).
    if parts == 1:
        assert plan.block_ranges(start) == (((start, start + total),),)


def test_block_parameters_are_leading_slices_of_the_layer():
    layer = LocallyConnected2d(1, 2, 3, (7, 5))
    plan = plan_split([layer], 2, (1, 7, 5))
    w, b = blocks.block_parameters(plan.layers[0], 1, layer)
    assert w.shape == (3, 3, 2, 9) and b.shape == (3, 3, 2)
    flat = torch.cat([p.detach().reshape(-1) for p in layer.parameters()])
    (lo_w, hi_w), (lo_b, hi_b) = plan.layers[0].params[1]
    torch.testing.assert_close(flat[lo_w:hi_w], w.detach().reshape(-1))
    torch.testing.assert_close(flat[lo_b:hi_b], b.detach().reshape(-1))


def test_segments_of_several_ranges_over_shards():
    shards = ((0, 10), (10, 20), (20, 30))
    segs = segments_of_ranges(2, [(25, 28), (5, 12)], shards)
    assert [(s.stage, s.shard, s.start, s.stop, s.pieces) for s in segs] == [
        (2, 0, 5, 10, ((5, 10),)),
        (2, 1, 10, 12, ((10, 12),)),
        (2, 2, 25, 28, ((25, 28),)),
    ]
    # On a layout, pieces follow its tensors as a stage's do; one range is a stage's segments.
    layout = Layout.build([30], 3, tensor_sizes=[8, 22])
    assert layout.segments_of_ranges(0, [(0, 30)]) == layout.segments_of_stage(0)
    # (tensors under MIN_PIECE elements are merged into one piece, as in a stage's segment)
    assert [s.pieces for s in layout.segments_of_ranges(0, [(6, 12)])] == [((6, 10),), ((10, 12),)]
