"""Partitions within a stage: each layer's units cut into P blocks (the paper's Figure 1). Pure.

A *block* holds its share of the units of every layer of a stage: output units ``[lo, hi)`` of
an ``nn.Linear``, output positions ``[lo, hi)`` of a ``LocallyConnected1d``, output rows
``[lo, hi)`` of a ``LocallyConnected2d`` (2-D layers are split along the height only). Its
parameters are the leading-dimension slice ``[lo, hi)`` of each of the layer's parameters
(``distbelief.nn`` puts the output position first for that reason), a contiguous range of the
layer's flat parameters, so a block through several layers owns one range per layer.

Between layers a block holds a *piece* of the activation: the slice ``[lo, hi)`` along the split
axis (:class:`Split`). Before a split layer's forward, the blocks exchange what crosses their
boundaries (:class:`Transfer`): a ``Linear`` needs its whole input, so every block sends its piece
to every other; a locally-connected layer needs only the input positions its receptive fields
reach, its own plus a *halo* of its neighbours'. In the backward pass each transfer goes back the
other way as a gradient, and an owner sums what it gets for its piece.

Element-wise layers (activations, dropout) follow the split: each block applies them to its
piece. ``Flatten`` and ``Unflatten`` are deferred: a block keeps its piece in the shape it was
cut in (:attr:`Split.view`) and only the logical shape changes, so a flatten that merges the
split axis with another costs nothing; the next split layer's input is rebuilt from the pieces in
that logical shape. Layers before the stage's first split layer see the stage's whole input and
run in every block. Any other layer is a :class:`ConfigError` naming it and its type.

:func:`plan_split` makes the plan of a stage; :func:`crossing_bytes` counts what crosses
between its blocks per training step; :func:`stage_cut` plans a cut between two stages that
sends each block of the next only its strip (:func:`cut_elements` counts it; a block's ends
of it are a :class:`CutEnds`). The block-level functions are what a partition actor calls:
:func:`strip_of_whole`, :func:`pieces_to_send`, :func:`assemble_strip`, :func:`block_forward`,
:func:`grads_to_return`, :func:`own_grad`, :func:`whole_input_grad`.
:func:`run_blocks` runs them all in one process (the reference the actors follow, and the
tests' oracle).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn import LocallyConnected1d, LocallyConnected2d, local1d, local2d
from .layout import Range

Shape = tuple[int, ...]
"""A per-example shape (no batch dimension)."""

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold,
    nn.Dropout, nn.AlphaDropout,
)  # fmt: skip
"""Parameter-free layers acting on each element alone: they follow the split. (A dropout draws
its masks per block, so a split net with dropout on is not the unsplit one bit for bit.)"""

RESHAPES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten)
SPLIT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, LocallyConnected1d, LocallyConnected2d)


def split_units(
    n: int, parts: int, owner: str = "the layer", unit: str = "units"
) -> tuple[Range, ...]:
    """``parts`` contiguous ``[lo, hi)`` ranges covering ``0..n``, sizes differing by <= 1 (cut
    as ``core/layout.py`` cuts shards). ``parts`` < 1 or > ``n`` is a ``ConfigError`` naming
    both, e.g. ``"partitions: 4 partitions but layer 2 (Linear) has only 3 output units"``."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ConfigError(f"partitions: must be an integer >= 1, got {parts!r}")
    if parts > n:
        raise ConfigError(f"partitions: {parts} partitions but {owner} has only {n} {unit}")
    bounds = [b * n // parts for b in range(parts + 1)]
    return tuple((bounds[b], bounds[b + 1]) for b in range(parts))


@dataclass(frozen=True)
class Split:
    """How an activation is cut into the blocks' pieces.

    The logical activation (what the unsplit layer gives) has per-example shape ``shape``. The
    pieces are cut along axis ``axis`` of ``view``, a shape with as many elements: block ``b``
    holds ``full.reshape(N, *view)`` narrowed to ``ranges[b]`` on that axis. ``view`` differs
    from ``shape`` only after a deferred ``Flatten``/``Unflatten``.
    """

    shape: Shape
    view: Shape
    axis: int
    """Index into ``view`` (the batch dimension not counted)."""
    ranges: tuple[Range, ...]

    @property
    def per_position(self) -> int:
        """Elements per example in one position of the split axis."""
        return math.prod(self.view) // self.view[self.axis]

    def assemble(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The logical activation ``(N, *shape)`` from all the blocks' pieces, in block order."""
        return torch.cat(list(pieces), dim=self.axis + 1).reshape(-1, *self.shape)

    def cut(self, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The blocks' pieces of a logical activation (views; the inverse of :meth:`assemble`)."""
        v = full.reshape(-1, *self.view)
        return tuple(v.narrow(self.axis + 1, lo, hi - lo) for lo, hi in self.ranges)


@dataclass(frozen=True)
class Transfer:
    """Input positions ``[start, stop)`` (along the input :class:`Split`'s axis) that block
    ``src`` holds and block ``dst`` needs before a split layer's forward; the gradient with
    respect to them goes back from ``dst`` to ``src`` in the backward pass. ``src == dst`` is the
    block's own part (nothing crosses)."""

    src: int
    dst: int
    start: int
    stop: int
    elements: int
    """Elements per example it carries (each way)."""


@dataclass(frozen=True)
class LayerPlan:
    """One layer of a stage, cut into blocks."""

    index: int
    """Position of the layer in the stage."""
    name: str
    """The layer's type name."""
    kind: str
    """``"linear"``, ``"local1d"``, ``"local2d"`` (split layers), ``"follow"`` (element-wise or
    deferred reshape on a split input) or ``"whole"`` (before the first split layer: every
    block runs it on the whole input)."""
    in_shape: Shape
    out_shape: Shape
    input: Split | None
    """How the input arrives: None when every block has all of it (the stage's input)."""
    output: Split | None
    """How the output is cut (None for a ``"whole"`` layer)."""
    in_axis: int
    """The axis of ``in_shape`` the split layer's receptive fields run along (-1 if none)."""
    needs: tuple[Range, ...]
    """Per block, the input positions along ``in_axis`` its outputs read (within the input;
    the rest of a receptive field is zero padding). Empty unless a split layer."""
    pads: tuple[tuple[int, int], ...]
    """Per block, the zeros before and after its strip along ``in_axis``."""
    transfers: tuple[Transfer, ...]
    """What the blocks exchange before the forward (empty if the input is whole)."""
    gather_all: bool
    """Whether a block rebuilds the whole logical input from every piece (a ``Linear``, or an
    input not cut along ``in_axis``), else its strip is its pieces laid end to end."""
    params: tuple[tuple[Range, ...], ...]
    """Per block, its ranges of the layer's flat parameters (relative to the first one)."""
    size: int
    """Number of parameters of the layer."""
    elementwise: bool = False
    """Whether the layer is element-wise (an activation, a dropout: one of ``ELEMENTWISE``)."""


@dataclass(frozen=True)
class StagePlan:
    """A stage's layers cut into ``parts`` blocks."""

    parts: int
    in_shape: Shape
    layers: tuple[LayerPlan, ...]

    @property
    def output(self) -> Split:
        """How the stage's output is cut (assemble it with :meth:`Split.assemble`)."""
        out = self.layers[-1].output
        assert out is not None  # plan_split refuses a stage with no split layer
        return out

    def block_ranges(self, start: int = 0) -> tuple[tuple[Range, ...], ...]:
        """Per block, its ranges of the flat parameter space, the stage's layers laid end to
        end from ``start``; adjacent ranges merged (with one block: the stage's one range)."""
        out = []
        for b in range(self.parts):
            ranges: list[Range] = []
            offset = start
            for layer in self.layers:
                for lo, hi in layer.params[b] if layer.params else ():
                    lo, hi = lo + offset, hi + offset
                    if ranges and ranges[-1][1] == lo:
                        ranges[-1] = (ranges[-1][0], hi)
                    elif lo < hi:
                        ranges.append((lo, hi))
                offset += layer.size
            out.append(tuple(ranges))
        return tuple(out)

    def crossing_elements(self) -> int:
        """Elements per example that cross between blocks in one forward pass (as many
        gradients cross back in the backward pass): the transfers between different blocks."""
        return sum(t.elements for layer in self.layers for t in layer.transfers if t.src != t.dst)


def crossing_bytes(plan: StagePlan, batch: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes that cross between a stage's blocks in one training step on a mini-batch of
    ``batch`` examples: every transfer between different blocks carries its activations forward
    and their gradient back, ``2 x crossing_elements() x batch x dtype's size``. Counted from
    the plan, not measured. Not counted: the stage's input, which every block of a stage
    receives whole, and its output, which goes to the next stage (or the loss) as pieces."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch: must be an integer >= 1, got {batch!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * plan.crossing_elements() * batch * itemsize


def _layer_name(index: int, layer: nn.Module) -> str:
    return f"layer {index} ({type(layer).__name__})"


def _reshape(index: int, layer: nn.Module, shape: Shape) -> Shape:
    """The per-example output shape of a Flatten or Unflatten on per-example ``shape``."""
    ndim = len(shape) + 1  # with the batch dimension, as the layer counts its dims

    def dim(d: int) -> int:
        d = d + ndim if d < 0 else d
        if d < 1 or d >= ndim:
            raise ConfigError(
                f"partitions: {_layer_name(index, layer)} reshapes dimension {d} of an input "
                f"of shape (N, {', '.join(map(str, shape))}); a block can reshape only "
                "dimensions after the batch"
            )
        return d - 1

    if isinstance(layer, nn.Flatten):
        a, b = dim(layer.start_dim), dim(layer.end_dim)
        return (*shape[:a], math.prod(shape[a : b + 1]), *shape[b + 1 :])
    assert isinstance(layer, nn.Unflatten)
    d = dim(layer.dim) if isinstance(layer.dim, int) else -1
    sizes = list(layer.unflattened_size)
    if d < 0 or not all(isinstance(s, int) for s in sizes):
        raise ConfigError(f"partitions: {_layer_name(index, layer)}: named dims not supported")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = shape[d] // known
    if math.prod(sizes) != shape[d]:
        raise ConfigError(
            f"partitions: {_layer_name(index, layer)} cannot unflatten {shape[d]} into {sizes}"
        )
    return (*shape[:d], *sizes, *shape[d + 1 :])


def _expect(index: int, layer: nn.Module, shape: Shape, expected: Shape) -> None:
    if shape != expected:
        raise ConfigError(
            f"partitions: {_layer_name(index, layer)} takes inputs of shape "
            f"(N, {', '.join(map(str, expected))}), the layers before it give "
            f"(N, {', '.join(map(str, shape))})"
        )


def _param_ranges(
    index: int, layer: nn.Module, units: int, outputs: tuple[Range, ...]
) -> tuple[tuple[tuple[Range, ...], ...], int]:
    """Per block, the leading-dimension slices of the layer's parameters as flat ranges."""
    per_block: list[list[Range]] = [[] for _ in outputs]
    offset = 0
    for name, p in layer.named_parameters():
        if p.dim() == 0 or p.shape[0] != units:
            raise ConfigError(
                f"partitions: {_layer_name(index, layer)} has a parameter {name!r} of shape "
                f"{tuple(p.shape)} whose first dimension is not its {units} output units"
            )
        row = p[0].numel()
        for b, (lo, hi) in enumerate(outputs):
            per_block[b].append((offset + lo * row, offset + hi * row))
        offset += p.numel()
    return tuple(tuple(r) for r in per_block), offset


def _transfers(
    split: Split, needs: tuple[Range, ...], direct: bool, full: int
) -> tuple[Transfer, ...]:
    """Who sends what to whom: the overlaps of each block's needs with each owner's range (in
    the split's own coordinates), or, if ``direct`` is false, every piece to every block."""
    out = []
    for dst, need in enumerate(needs):
        lo_need, hi_need = need if direct else (0, full)
        for src, (lo, hi) in enumerate(split.ranges):
            a, z = max(lo, lo_need), min(hi, hi_need)
            if a < z:
                out.append(Transfer(src, dst, a, z, (z - a) * split.per_position))
    return tuple(out)


def plan_split(layers: Sequence[nn.Module], parts: int, in_shape: Sequence[int]) -> StagePlan:
    """The plan of a stage's ``layers`` cut into ``parts`` blocks, for inputs of per-example
    shape ``in_shape``. A layer that cannot be split, ``parts`` < 1, or more parts than a split
    layer has units (positions, rows) is a ``ConfigError`` naming it."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ConfigError(f"partitions: must be an integer >= 1, got {parts!r}")
    shape: Shape = tuple(int(d) for d in in_shape)
    split: Split | None = None
    plans: list[LayerPlan] = []
    for i, layer in enumerate(layers):
        name = type(layer).__name__
        if isinstance(layer, SPLIT_LAYERS):
            if isinstance(layer, nn.Linear):
                kind, in_axis = "linear", len(shape) - 1
                if not shape or shape[-1] != layer.in_features:
                    _expect(i, layer, shape, (*shape[:-1], layer.in_features))
                out_shape = (*shape[:-1], layer.out_features)
                units, what, out_axis = layer.out_features, "output units", len(shape) - 1
            elif isinstance(layer, LocallyConnected1d):
                kind, in_axis, out_axis = "local1d", 1, 1
                _expect(i, layer, shape, (layer.in_channels, layer.input_length))
                out_shape = (layer.out_channels, layer.out_length)
                units, what = layer.out_length, "output positions"
            else:
                kind, in_axis, out_axis = "local2d", 1, 1
                _expect(i, layer, shape, (layer.in_channels, *layer.input_size))
                out_shape = (layer.out_channels, *layer.out_size)
                units, what = layer.out_size[0], "output rows"
            outputs = split_units(units, parts, _layer_name(i, layer), what)
            length = shape[in_axis]
            if kind == "linear":
                needs = tuple((0, length) for _ in outputs)
                pads = tuple((0, 0) for _ in outputs)
            else:
                k = layer.kernel_size if kind == "local1d" else layer.kernel_size[0]
                s = layer.stride if kind == "local1d" else layer.stride[0]
                p = layer.padding if kind == "local1d" else layer.padding[0]
                first = [lo * s - p for lo, _ in outputs]  # receptive fields, padded input
                last = [(hi - 1) * s + k - p for _, hi in outputs]
                needs = tuple((max(a, 0), min(z, length)) for a, z in zip(first, last))
                pads = tuple((max(0, -a), max(0, z - length)) for a, z in zip(first, last))
            direct = split is not None and split.view == shape and split.axis == in_axis
            gather_all = kind == "linear" or not direct
            transfers = (
                () if split is None else _transfers(split, needs, direct, split.view[split.axis])
            )
            params, size = _param_ranges(i, layer, units, outputs)
            out = Split(out_shape, out_shape, out_axis, outputs)
            plans.append(
                LayerPlan(
                    index=i,
                    name=name,
                    kind=kind,
                    in_shape=shape,
                    out_shape=out_shape,
                    input=split,
                    output=out,
                    in_axis=in_axis,
                    needs=needs,
                    pads=pads,
                    transfers=transfers,
                    gather_all=gather_all,
                    params=params,
                    size=size,
                )  # fmt: skip
            )
        elif isinstance(layer, ELEMENTWISE + RESHAPES):
            if any(True for _ in layer.parameters()):
                raise ConfigError(f"partitions: {_layer_name(i, layer)} has parameters")
            out_shape = _reshape(i, layer, shape) if isinstance(layer, RESHAPES) else shape
            kind = "whole" if split is None else "follow"
            out = None if split is None else Split(out_shape, split.view, split.axis, split.ranges)
            none = tuple(() for _ in range(parts))
            plans.append(
                LayerPlan(
                    index=i,
                    name=name,
                    kind=kind,
                    in_shape=shape,
                    out_shape=out_shape,
                    input=split,
                    output=out,
                    in_axis=-1,
                    needs=(),
                    pads=(),
                    transfers=(),
                    gather_all=False,
                    params=none,
                    size=0,
                    elementwise=isinstance(layer, ELEMENTWISE),
                )  # fmt: skip
            )
        else:
            raise ConfigError(
                f"partitions: {_layer_name(i, layer)} cannot be split into blocks; a stage with "
                "partitions takes Linear, LocallyConnected1d/2d, element-wise layers "
                "(activations, Dropout), Flatten and Unflatten"
            )
        split = plans[-1].output
        shape = out_shape
    if split is None:
        names = ", ".join(type(m).__name__ for m in layers) or "none"
        raise ConfigError(
            f"partitions: the stage's layers ({names}) have no units to split; it needs a "
            "Linear or a locally-connected layer"
        )
    return StagePlan(parts, tuple(int(d) for d in in_shape), tuple(plans))


def stage_plans(
    stage_layers: list[list[nn.Module]], parts: int, in_shape: tuple[int, ...]
) -> list[StagePlan]:
    """Each stage's layers cut into ``parts`` blocks (:func:`plan_split`), for inputs
    of per-example shape ``in_shape``: a layer that cannot be split, or with fewer units than
    blocks, is a ``ConfigError`` naming it (and its stage, with several)."""
    plans: list[StagePlan] = []
    shape = in_shape
    for s, group in enumerate(stage_layers):
        try:
            plan = plan_split(group, parts, shape)
        except ConfigError as exc:
            if len(stage_layers) == 1:
                raise
            raise ConfigError(f"{exc} (in stage {s}: layers numbered within it)") from None
        plans.append(plan)
        shape = plan.output.shape
    return plans


def stage_cut(previous: StagePlan, plan: StagePlan) -> LayerPlan | None:
    """What crosses the cut into ``plan``'s stage from ``previous``'s, when only strips need
    to: the stage's first split layer is locally connected, only element-wise layers come
    before it (they commute with the cut: a block applies them to its strip), and it reads its
    input along the axis the previous stage's output is cut on. Then it is that layer's plan
    with the previous stage's output as its input and, per block, the parts of the previous
    blocks' pieces its strip reads (``transfers``: ``src`` a previous block, ``dst`` one of
    this stage's), so a block of the next stage gets its strip (its own positions and a halo),
    not every piece; its strip's gradient goes back the same way (:func:`pieces_to_send`,
    :func:`assemble_strip`, :func:`grads_to_return`, :func:`own_grad` work on it as on a layer
    within a stage). None otherwise (a ``Linear`` reads all of its input; a reshape first; a
    previous block nobody reads, with a stride longer than the kernel): every piece goes to
    every block, which assembles the whole input."""
    out = previous.output
    first = next(lp for lp in plan.layers if lp.kind != "whole")  # its first split layer
    if first.kind not in ("local1d", "local2d"):
        return None
    if not all(lp.elementwise for lp in plan.layers[: first.index]):
        return None  # a reshape first
    if out.view != first.in_shape or out.axis != first.in_axis or previous.parts != plan.parts:
        return None
    transfers = _transfers(out, first.needs, True, out.view[out.axis])
    sources = {t.src for t in transfers}
    if len(sources) < previous.parts or {t.dst for t in transfers} != set(range(plan.parts)):
        return None
    return dataclasses.replace(first, input=out, transfers=transfers, gather_all=False)


@dataclass(frozen=True)
class CutEnds:
    """One block's ends of the :func:`stage_cut` into its stage (``entry``) and out of it into
    the next (``exit``), None where every piece goes to every block: whom it hears from and
    sends to across them, and what. A partition actor routes these; the maths is here."""

    block: int
    entry: LayerPlan | None
    exit: LayerPlan | None

    @functools.cached_property  # (per message otherwise: on the hot path)
    def sources(self) -> dict[int, Transfer]:
        """Per previous block it reads from across ``entry``, what it reads."""
        cut = self.entry
        return {t.src: t for t in cut.transfers if t.dst == self.block} if cut else {}

    @functools.cached_property
    def readers(self) -> dict[int, Transfer]:
        """Per next block that reads from it across ``exit``, what that block reads."""
        cut = self.exit
        return {t.dst: t for t in cut.transfers if t.src == self.block} if cut else {}

    def strip(self, received: Mapping[int, torch.Tensor]) -> torch.Tensor | None:
        """The block's input strip once every source's part is in (``received``: by previous
        block), else None."""
        assert self.entry is not None
        sources = self.sources
        if len(received) < len(sources):
            return None
        got = [(sources[src], v) for src, v in received.items()]
        return assemble_strip(self.entry, self.block, got)

    def parts(self, out: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(next block, part)``: what of its output piece ``out`` each reader reads (a copy
        where it is part of it, else ``out`` itself)."""
        assert self.exit is not None
        return [
            (t.dst, v if v.shape == out.shape else v.clone())
            for t, v in pieces_to_send(self.exit, self.block, out)
        ]

    def waits_for(self, next_blocks: int) -> int:
        """How many gradients of its output piece the block waits for, of ``next_blocks`` in
        the next stage: one from each that reads it across ``exit``, else one from each."""
        return len(self.readers) if self.exit is not None else next_blocks

    def output_grad(self, out: torch.Tensor, grads: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The gradient of its output piece ``out`` from every reader's (``grads``: by next
        block, each of what that block read), summed at their positions."""
        assert self.exit is not None and len(grads) == len(self.readers)
        got = [(self.readers[d], g) for d, g in grads.items()]
        return own_grad(self.exit, self.block, out, got)

    def input_grads(self, strip_grad: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(previous block, gradient)``: its strip's gradient cut by the part each source
        gave (copies)."""
        assert self.entry is not None
        return [(t.src, g.clone()) for t, g in grads_to_return(self.entry, self.block, strip_grad)]


def cut_elements(previous: StagePlan, plan: StagePlan) -> int:
    """Elements per example that cross the cut between two stages of blocks in one forward
    pass (as many gradients cross back): every previous piece to every block, or, with a
    :func:`stage_cut`, only the strips. Counted from the plans."""
    cut = stage_cut(previous, plan)
    if cut is not None:
        return sum(t.elements for t in cut.transfers)
    out = previous.output
    return math.prod(out.shape) * plan.parts


# ------------------------------------------------------------- what one block does, per layer


def block_parameters(plan: LayerPlan, block: int, layer: nn.Module) -> list[torch.Tensor]:
    """The block's slices of the layer's parameters (views: leading dimension ``[lo, hi)``)."""
    if plan.output is None or plan.kind == "follow":
        return []
    lo, hi = plan.output.ranges[block]
    return [p[lo:hi] for p in layer.parameters()]


def strip_of_whole(plan: LayerPlan, block: int, x: torch.Tensor) -> torch.Tensor:
    """The block's input strip when it has the whole input ``(N, *in_shape)`` (the stage's
    first split layer): the positions it needs along the layer's axis."""
    lo, hi = plan.needs[block]
    return x.narrow(plan.in_axis + 1, lo, hi - lo)


def pieces_to_send(
    plan: LayerPlan, block: int, piece: torch.Tensor
) -> list[tuple[Transfer, torch.Tensor]]:
    """What the block sends before the layer's forward: per transfer it is the source of, the
    part of its piece (of the layer's input) the transfer names. Includes its own part
    (``src == dst``), which it keeps."""
    split = plan.input
    assert split is not None
    own = split.ranges[block][0]
    return [
        (t, piece.narrow(split.axis + 1, t.start - own, t.stop - t.start))
        for t in plan.transfers
        if t.src == block
    ]


def assemble_strip(
    plan: LayerPlan, block: int, received: Sequence[tuple[Transfer, torch.Tensor]]
) -> torch.Tensor:
    """The block's input strip from what it received (every transfer whose ``dst`` it is,
    its own part included, in any order)."""
    split = plan.input
    assert split is not None
    parts = [v for _, v in sorted(received, key=lambda tv: tv[0].start)]
    if len(parts) == 1:
        strip = parts[0]  # all its own: no copy
    elif plan.kind == "local1d" and not plan.gather_all:
        # laid out position-major, as local1d works (its permute to (L, N, C) is then free)
        dim = split.axis + 1
        strip = torch.cat([v.movedim(dim, 0) for v in parts]).movedim(0, dim)
    else:
        strip = torch.cat(parts, dim=split.axis + 1)
    if not plan.gather_all:
        return strip
    lo, hi = plan.needs[block]
    return strip.reshape(-1, *plan.in_shape).narrow(plan.in_axis + 1, lo, hi - lo)


def padded_strip(
    plan: LayerPlan, block: int, received: Sequence[tuple[Transfer, torch.Tensor]]
) -> tuple[torch.Tensor, int]:
    """:func:`assemble_strip` of a ``local1d`` layer whose input is cut along its positions,
    with the block's zero padding (``plan.pads[block]``) already in it: one position-major
    buffer the pieces are copied into once, which :func:`~distbelief.nn.local1d` then reads
    as it is (``pads`` (0, 0) to :func:`block_forward`), in place of a strip and a padded
    copy of it. Returns the strip ``(N, C, before + positions + after)`` and ``before``."""
    parts = [v for _, v in sorted(received, key=lambda tv: tv[0].start)]
    before, after = plan.pads[block]
    n, c = parts[0].shape[:2]
    positions = sum(v.shape[2] for v in parts)
    buf = parts[0].new_empty(before + positions + after, n, c)
    buf[:before].zero_()
    buf[before + positions :].zero_()
    at = before
    for v in parts:
        buf[at : at + v.shape[2]].copy_(v.permute(2, 0, 1))
        at += v.shape[2]
    return buf.permute(1, 2, 0), before


def block_forward(
    plan: LayerPlan,
    block: int,
    layer: nn.Module,
    x: torch.Tensor,
    params: Sequence[torch.Tensor] | None = None,
    wgrad_into: torch.Tensor | None = None,
    pads: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The block's output piece: of a split layer from its input strip and its parameters
    (``params``: weight and bias slices, by default :func:`block_parameters`), of an
    element-wise layer from its piece, of a deferred reshape its piece unchanged. With
    ``wgrad_into``, a ``local1d`` layer's backward writes its weight's gradient there; with
    ``pads``, a ``local1d`` layer's strip is padded by those (a :func:`padded_strip`: (0, 0))
    in place of the plan's."""
    if plan.kind == "whole":
        return layer(x)
    if plan.kind == "follow":
        return x if isinstance(layer, RESHAPES) else layer(x)
    weight, *rest = block_parameters(plan, block, layer) if params is None else params
    bias = rest[0] if rest else None
    if plan.kind == "linear":
        fn, args = F.linear, (x, weight, bias)
    elif plan.kind == "local1d":
        pad = plan.pads[block] if pads is None else pads
        fn, args = local1d, (x, weight, bias, layer.kernel_size, layer.stride, pad)
    else:
        pw = layer.padding[1]
        top, bottom = plan.pads[block]
        fn = local2d
        args = (x, weight, bias, layer.kernel_size, layer.stride, (pw, pw, top, bottom))
    # (wgrad_into only says where the backward writes: not an argument of the arithmetic)
    out = fn(*args, wgrad_into) if fn is local1d else fn(*args)
    if _BLOCK_HOOKS:  # (none registered: nothing to pay)
        for hook in tuple(_BLOCK_HOOKS):
            hook(fn, args, out)
    return out


_BLOCK_HOOKS: list[Callable[[Callable[..., torch.Tensor], tuple, torch.Tensor], None]] = []


def register_block_hook(
    hook: Callable[[Callable[..., torch.Tensor], tuple, torch.Tensor], None],
) -> Callable[[], None]:
    """Call ``hook(function, args, output)`` each time :func:`block_forward` runs a split
    layer's slice as a function (``F.linear``, ``local1d``, ``local2d``: no module call, so no
    module hook sees it), e.g. to count its arithmetic. Returns what removes it."""
    _BLOCK_HOOKS.append(hook)

    def remove() -> None:
        if hook in _BLOCK_HOOKS:
            _BLOCK_HOOKS.remove(hook)

    return remove


def grads_to_return(
    plan: LayerPlan, block: int, strip_grad: torch.Tensor
) -> list[tuple[Transfer, torch.Tensor]]:
    """The backward of :func:`assemble_strip`: per transfer the block received, the gradient
    with respect to those positions, to go back to its source (its own part included)."""
    split = plan.input
    assert split is not None
    mine = [t for t in plan.transfers if t.dst == block]
    if plan.gather_all:
        lo, hi = plan.needs[block]
        full_len = plan.in_shape[plan.in_axis]
        full = F.pad(strip_grad, _pad_arg(strip_grad.dim(), plan.in_axis + 1, lo, full_len - hi))
        g = full.reshape(-1, *split.view)
        return [(t, g.narrow(split.axis + 1, t.start, t.stop - t.start)) for t in mine]
    first = min(t.start for t in mine)
    return [(t, strip_grad.narrow(split.axis + 1, t.start - first, t.stop - t.start)) for t in mine]


def own_grad(
    plan: LayerPlan,
    block: int,
    piece: torch.Tensor,
    returned: Sequence[tuple[Transfer, torch.Tensor]],
    add_into_own: bool = False,
) -> torch.Tensor:
    """The gradient with respect to ``piece``, the block's piece of the layer's input: the sum
    of what came back (every transfer whose ``src`` it is, its own part included), each added
    at its positions; zero where no block read it (a stride longer than the kernel).

    With ``add_into_own``, where the block read all of its own piece, the others' parts are
    added into that part's gradient in place and it is returned (no zeroed sum and no copy of
    it: a block's own part is most of the gradient); only for a caller that owns it."""
    split = plan.input
    assert split is not None
    own_lo, own_hi = split.ranges[block]
    whole = [g for t, g in returned if t.dst == block and (t.start, t.stop) == (own_lo, own_hi)]
    if whole and (add_into_own or len(returned) == 1):
        total = whole[0]  # (alone: one block read all of it, its owner with P = 1)
        for t, g in returned:
            if g is not total:
                total.narrow(split.axis + 1, t.start - own_lo, t.stop - t.start).add_(g)
        return total
    total = torch.zeros_like(piece)
    for t, g in returned:
        total.narrow(split.axis + 1, t.start - own_lo, t.stop - t.start).add_(g)
    return total


def whole_input_grad(plan: LayerPlan, block: int, strip_grad: torch.Tensor) -> torch.Tensor:
    """The block's partial gradient with respect to the whole input of the stage's first split
    layer (zeros outside its strip); the stage's input gradient is the sum over blocks."""
    lo, hi = plan.needs[block]
    full_len = plan.in_shape[plan.in_axis]
    return F.pad(strip_grad, _pad_arg(strip_grad.dim(), plan.in_axis + 1, lo, full_len - hi))


def _pad_arg(ndim: int, dim: int, before: int, after: int) -> tuple[int, ...]:
    """``F.pad``'s argument padding only dimension ``dim`` of an ``ndim``-dimensional tensor."""
    pad = [0] * (2 * (ndim - dim))
    pad[-2:] = [before, after]
    return tuple(pad)


# ------------------------------------------------------------------- all blocks in one process


@dataclass
class BlocksRun:
    """What :func:`run_blocks` returns."""

    output: torch.Tensor
    """The stage's output, assembled from the blocks' pieces."""
    input_grad: torch.Tensor
    """The gradient with respect to the stage's input (the blocks' partials summed)."""
    param_grads: list[list[torch.Tensor]]
    """Per block, the gradients of its parameter slices, layer by layer in layer order."""


def run_blocks(
    plan: StagePlan, layers: Sequence[nn.Module], x: torch.Tensor, grad_output: torch.Tensor
) -> BlocksRun:
    """Forward and backward of the stage block by block, messages passed by hand: what the
    partition actors do, in one process. Each block computes only its own slices, from the
    strips the transfers give it; autograd is used one layer of one block at a time."""
    P = plan.parts
    # per layer: the blocks' input pieces, and per block (strip, parameter slices, output)
    saved: list[tuple[list[torch.Tensor], list[tuple]]] = []
    pieces: list[torch.Tensor] = [x] * P  # the stage's whole input, in every block
    for lp, layer in zip(plan.layers, layers):
        if lp.kind in ("whole", "follow"):
            inputs = pieces
        elif lp.input is None:
            inputs = [strip_of_whole(lp, b, pieces[b]) for b in range(P)]
        else:
            inbox: list[list] = [[] for _ in range(P)]
            for b in range(P):
                for t, v in pieces_to_send(lp, b, pieces[b]):
                    inbox[t.dst].append((t, v))
            inputs = [assemble_strip(lp, b, inbox[b]) for b in range(P)]
        step = []
        outs = []
        for b in range(P):
            xin = inputs[b].detach().requires_grad_()
            params = [p.detach().requires_grad_() for p in block_parameters(lp, b, layer)]
            out = block_forward(lp, b, layer, xin, params)
            step.append((xin, params, out))
            outs.append(out.detach())
        saved.append((pieces, step))
        pieces = outs
    grads = list(plan.output.cut(grad_output))
    param_grads: list[list[torch.Tensor]] = [[] for _ in range(P)]
    for lp, (pieces_in, step) in zip(reversed(plan.layers), reversed(saved)):
        strip_grads = []
        for b, (xin, params, out) in enumerate(step):
            g = torch.autograd.grad(out, [xin, *params], grads[b], allow_unused=True)
            strip_grads.append(g[0] if g[0] is not None else torch.zeros_like(xin))
            param_grads[b][:0] = list(g[1:])
        if lp.kind in ("whole", "follow"):
            grads = strip_grads
        elif lp.input is None:  # each block's partial, back through its copy of what came before
            grads = [whole_input_grad(lp, b, strip_grads[b]) for b in range(P)]
        else:
            back: list[list] = [[] for _ in range(P)]
            for b in range(P):
                for t, g in grads_to_return(lp, b, strip_grads[b]):
                    back[t.src].append((t, g))
            grads = [own_grad(lp, b, pieces_in[b], back[b], True) for b in range(P)]
    # Every block held the whole input: their partial gradients sum.
    input_grad = torch.stack(grads).sum(0)
    return BlocksRun(plan.output.assemble(pieces), input_grad, param_grads)


# ------------------------------------------------- a locally-connected block, halo and interior


def _field(lp: LayerPlan, layer: nn.Module, o: int) -> tuple[int, int]:
    """The input positions (within the input, padding left out) output position ``o`` of a
    ``local1d`` layer reads."""
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    length = lp.in_shape[lp.in_axis]
    return max(o * s - p, 0), min(o * s - p + k, length)


def interior(lp: LayerPlan, layer: nn.Module, block: int) -> tuple[int, int]:
    """The block's *interior* outputs of a ``local1d`` layer whose input is cut along its
    positions: ``[a, z)`` (absolute output positions, possibly empty, ``a`` = ``z``), the
    outputs whose receptive fields lie within the block's own piece, so that it can compute
    them before any halo arrives. The rest of ``[lo, hi)`` are its edges."""
    assert lp.kind == "local1d" and lp.input is not None and lp.output is not None
    lo, hi = lp.output.ranges[block]
    own_lo, own_hi = lp.input.ranges[block]
    inside = [o for o in range(lo, hi) if own_lo <= _field(lp, layer, o)[0]]
    inside = [o for o in inside if _field(lp, layer, o)[1] <= own_hi]
    if not inside:
        return lo, lo
    return inside[0], inside[-1] + 1


def local1d_part(
    lp: LayerPlan,
    layer: nn.Module,
    block: int,
    x: torch.Tensor,
    x_lo: int,
    params: Sequence[torch.Tensor],
    a: int,
    z: int,
    wgrad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Outputs ``[a, z)`` of a ``local1d`` layer's block from ``x``, input positions from
    ``x_lo`` on (its own piece, or its strip): the output, and the input and parameter slices
    it was computed from (views, to take gradients with respect to). With ``wgrad``, a buffer
    of the block's weight's shape, its backward writes the weight's gradient into its rows."""
    assert lp.output is not None
    lo = lp.output.ranges[block][0]
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    length = lp.in_shape[lp.in_axis]
    start, stop = _field(lp, layer, a)[0], _field(lp, layer, z - 1)[1]
    xin = x.narrow(2, start - x_lo, stop - start)
    pads = (max(0, p - a * s), max(0, (z - 1) * s - p + k - length))
    sliced = [q.narrow(0, a - lo, z - a) for q in params]
    weight, bias = sliced[0], (sliced[1] if len(sliced) > 1 else None)
    into = None if wgrad is None else wgrad.narrow(0, a - lo, z - a)
    return local1d(xin, weight, bias, k, s, pads, into), xin, sliced


@dataclass
class _Overlapped:
    """What a block keeps of an overlapped ``local1d`` layer for its backward pass: per part
    (left edge, interior, right edge; empty ones left out) its output range, output, input
    slice and parameter slices; where its strip starts and how wide it is; its interior."""

    parts: list[tuple[int, int, torch.Tensor, torch.Tensor, list[torch.Tensor]]]
    strip_lo: int
    strip_len: int
    inner: tuple[int, int]
    wgrad: torch.Tensor
    """The weight's gradient, filled by the parts' backward passes."""
    strip_grad: torch.Tensor | None = None


# ------------------------------------------------------------- one block's pass, resumable

Send = tuple[int, int, torch.Tensor]
"""``(block, layer, tensor)``: what a block sends another across their boundary before (or,
going back, after) the stage's layer ``layer``: a part of its piece, or a gradient."""


class BlockPass:
    """One block's forward and backward pass of one mini-batch through its stage, as a
    partition actor runs it: :func:`run_blocks`'s loop for one block, stopping at each split
    layer whose input strip needs other blocks' pieces (forward) and at each whose input
    gradient needs other blocks' partials (backward), and carrying on when they are given.

    Pure: :meth:`forward` and :meth:`backward` return what to send (``Send``: block, layer,
    tensor, a fresh copy); :meth:`receive` and :meth:`receive_grad` take what came, in any
    order and at any time (before the pass reaches that layer too). ``params`` are, per layer,
    the block's parameter slices as leaf tensors (empty for a layer without any): the
    parameters' gradients are taken with respect to them (:attr:`param_grads`). With
    ``wants_input`` false (the first stage) the gradient of the stage's input is not computed.
    With ``strip_input`` (a :func:`stage_cut` into the stage) the input given to :meth:`start`
    is the block's strip of its first layer's input, not all of it, and :attr:`input_grad`
    is that strip's gradient.

    With ``overlap``, a ``local1d`` layer whose input is cut along its positions is computed
    in two goes, so that the hop of its halo is hidden behind compute: forward, the block
    sends its edges and returns at once (:attr:`more` set), then computes its *interior*
    outputs (:func:`interior`: they read only its own piece) while the halos travel, and its
    edge outputs once they are in; backward, it first takes the gradient of its edge outputs,
    returns the halos' gradients to send (:attr:`more` set), then takes its interior's. The
    caller calls :meth:`forward` (:meth:`backward`) again while :attr:`more` is set. The
    values are the same (the same per-position products, grouped differently: equal to
    float rounding).
    """

    def __init__(
        self,
        plan: StagePlan,
        block: int,
        layers: Sequence[nn.Module],
        wants_input: bool = True,
        overlap: bool = False,
        strip_input: bool = False,
    ) -> None:
        self.plan, self.block, self.layers = plan, block, layers
        self.wants_input = wants_input
        self.strip_input = strip_input
        self.overlap = overlap
        self.more = False
        """Whether the last call returned early with work it can do now (call it again)."""
        self.inner: dict[int, tuple] = {}  # layer -> its interior, computed before the halos
        self.padded: dict[int, tuple[int, int]] = {}  # layer -> its padded strip's (before, n)
        self._part_grads: list[list[torch.Tensor]] = []  # of an overlapped layer's parts
        self.params: Sequence[Sequence[torch.Tensor]] = ()
        self.layer = 0  # the next layer to run forward
        self.current: torch.Tensor | None = None  # what enters it
        self.saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # piece, in, out
        self.arrived: dict[tuple[int, int], torch.Tensor] = {}  # (layer, src block) -> part
        self.returned: dict[tuple[int, int], torch.Tensor] = {}  # (layer, dst block) -> grad
        self.sent = -1  # the last layer whose transfers were sent (forward)
        self.back = -1  # the next layer to run backward (-1: not started, or done)
        self.awaiting = False  # its strip's gradients are sent, it waits for its own
        self.grad: torch.Tensor | None = None  # the gradient flowing back
        self.output: torch.Tensor | None = None
        """The block's piece of the stage's output, once the forward pass is done."""
        self.input_grad: torch.Tensor | None = None
        """The block's partial gradient of the stage's whole input (the blocks' partials
        sum), or with ``strip_input`` its strip's, once the backward pass is done (with
        ``wants_input``)."""
        self.param_grads: list[list[torch.Tensor]] = [[] for _ in layers]
        """Per layer, the gradients of the block's parameter slices."""
        self.done = False
        """Whether the backward pass is done."""

    def receive(self, layer: int, src: int, values: torch.Tensor) -> None:
        """Block ``src``'s part of its piece, for the strip of ``layer``."""
        self.arrived[layer, src] = values

    def receive_grad(self, layer: int, dst: int, grad: torch.Tensor) -> None:
        """Block ``dst``'s gradient of the part of this block's piece it read for ``layer``."""
        self.returned[layer, dst] = grad

    def start(self, x: torch.Tensor, params: Sequence[Sequence[torch.Tensor]]) -> list[Send]:
        """Begin the forward pass on the stage's input ``x`` (all of it, or with ``strip_input``
        the block's strip) with ``params``."""
        self.current, self.params = x, params
        # The flat gradient, laid out as the parameters: a locally-connected layer's backward
        # writes its weight's gradient straight into its place (the bulk of a block's
        # parameters: no copy of it in :meth:`flat_param_grad`).
        total = sum(q.numel() for layer in params for q in layer)
        first = next((q for layer in params for q in layer), None)
        self._flat = x.new_empty(total, dtype=first.dtype if first is not None else x.dtype)
        self._views: list[list[torch.Tensor]] = []
        offset = 0
        for layer in params:
            views = []
            for q in layer:
                views.append(self._flat[offset : offset + q.numel()].view(q.shape))
                offset += q.numel()
            self._views.append(views)
        return self.forward()

    def _overlaps(self, lp: LayerPlan, mine: Sequence[Transfer]) -> bool:
        """Whether this layer is computed in two goes (see the class doc)."""
        return (
            self.overlap
            and lp.kind == "local1d"
            and not lp.gather_all
            and any(t.src != self.block for t in mine)
        )

    def _interior_forward(self, i: int, lp: LayerPlan, layer: nn.Module) -> tuple:
        """The interior outputs of layer ``i`` from the block's own part of its input."""
        a, z = interior(lp, layer, self.block)
        wgrad = self._views[i][0]  # the weight's place in the flat gradient
        if a == z:
            return (a, z, None, None, [], wgrad)
        own = self.arrived[i, self.block].detach().requires_grad_()
        self.arrived[i, self.block] = own
        own_t = next(t for t in lp.transfers if t.src == t.dst == self.block)
        params = self.params[i]
        out, xin, sliced = local1d_part(
            lp, layer, self.block, own, own_t.start, params, a, z, wgrad
        )
        return (a, z, out, xin, sliced, wgrad)

    def _edges_forward(
        self, i: int, lp: LayerPlan, layer: nn.Module, piece: torch.Tensor, got: list
    ) -> None:
        """Layer ``i``'s edge outputs, once the halos are in, and its whole output piece."""
        b = self.block
        assert lp.output is not None
        lo, hi = lp.output.ranges[b]
        a, z, inner_out, inner_in, inner_params, wgrad = self.inner.pop(i)
        # the halos are leaves; the own part already is (the interior read it)
        got = [(t, v if t.src == b else v.detach().requires_grad_()) for t, v in got]
        strip = assemble_strip(lp, b, got)
        strip_lo = min(t.start for t, _ in got)
        parts = []
        for pa, pz in ((lo, a), (a, z), (z, hi)):
            if pa == pz:
                continue
            if (pa, pz) == (a, z):
                parts.append((pa, pz, inner_out, inner_in, inner_params))
                continue
            params = self.params[i]
            out, xin, sliced = local1d_part(lp, layer, b, strip, strip_lo, params, pa, pz, wgrad)
            parts.append((pa, pz, out, xin, sliced))
        out = torch.cat([q[2] for q in parts], dim=2) if len(parts) > 1 else parts[0][2]
        held = _Overlapped(parts, strip_lo, strip.shape[2], (a, z), wgrad)
        self.saved.append((piece, held, out))  # type: ignore[arg-type]
        self.current = out.detach()
        self.layer += 1

    def forward(self) -> list[Send]:
        """Run layers until one needs what has not arrived, or the stage's output is done."""
        plan, b = self.plan, self.block
        sends: list[Send] = []
        self.more = False
        while self.current is not None and self.layer < len(plan.layers):
            i = self.layer
            lp, layer, piece = plan.layers[i], self.layers[i], self.current
            if lp.kind in ("whole", "follow"):
                xin = piece
            elif lp.input is None:
                xin = piece if self.strip_input else strip_of_whole(lp, b, piece)
            else:
                mine = [t for t in lp.transfers if t.dst == b]
                split_halo = self._overlaps(lp, mine)
                if self.sent < i:
                    self.sent = i
                    for t, v in pieces_to_send(lp, b, piece):
                        if t.dst == b:
                            self.arrived[i, b] = v
                        else:
                            sends.append((t.dst, i, v.clone()))
                    if split_halo and sends:
                        self.more = True  # send the halo first, then compute the interior
                        return sends
                if split_halo and i not in self.inner:
                    self.inner[i] = self._interior_forward(i, lp, layer)
                if any((i, t.src) not in self.arrived for t in mine):
                    return sends
                got = [(t, self.arrived.pop((i, t.src))) for t in mine]
                if split_halo:
                    self._edges_forward(i, lp, layer, piece, got)
                    continue
                if lp.kind == "local1d" and not lp.gather_all:
                    xin, before = padded_strip(lp, b, got)
                    self.padded[i] = (before, sum(t.stop - t.start for t in mine))
                else:
                    xin = assemble_strip(lp, b, got)
            xin = xin.detach().requires_grad_()
            used = xin.clone() if getattr(layer, "inplace", False) else xin
            into = self._views[i][0] if lp.kind == "local1d" else None
            params = self.params[i] if self.params[i] else None
            pads = (0, 0) if i in self.padded else None
            out = block_forward(lp, b, layer, used, params, into, pads)
            self.saved.append((piece, xin, out))
            self.current = out.detach()
            self.layer += 1
        if self.layer == len(plan.layers):
            self.output = self.current
        return sends

    def backward(self, grad: torch.Tensor | None = None) -> list[Send]:
        """Begin the backward pass with ``grad``, the gradient of the block's output piece
        (or, without it, carry on); run layers back until one needs what has not returned."""
        plan, b = self.plan, self.block
        if grad is not None:
            self.grad, self.back = grad, len(plan.layers) - 1
        sends: list[Send] = []
        self.more = False
        while self.back >= 0:
            i = self.back
            lp = plan.layers[i]
            piece, xin, out = self.saved[i]
            if isinstance(xin, _Overlapped):
                if xin.strip_grad is None:
                    halos = self._edges_backward(i, lp, xin)
                    if halos:
                        self.more = True  # the halos' gradients first, then the interior
                        return sends + halos
                if not self.awaiting:
                    self._interior_backward(i, lp, xin)
                    self.awaiting = True
                mine = [t for t in lp.transfers if t.src == b]
                if any((i, t.dst) not in self.returned for t in mine):
                    return sends
                got = [(t, self.returned.pop((i, t.dst))) for t in mine]
                self.grad = own_grad(lp, b, piece, got, add_into_own=True)
                self.awaiting, self.back = False, i - 1
                continue
            if not self.awaiting:
                params = list(self.params[i])
                last = not self.wants_input and lp.input is None  # nothing before needs it
                inputs = params if last else [xin, *params]
                got = (
                    torch.autograd.grad(
                        out, inputs, self.grad, allow_unused=True, materialize_grads=True
                    )
                    if inputs
                    else ()
                )
                self.param_grads[i] = list(got[len(got) - len(params) :]) if params else []
                if last:
                    self.back = -1
                    break
                strip_grad = got[0]
                if i in self.padded:  # the padding's rows are nobody's
                    before, positions = self.padded.pop(i)
                    strip_grad = strip_grad.narrow(2, before, positions)
                if lp.kind in ("whole", "follow"):
                    self.grad, self.back = strip_grad, i - 1
                    continue
                if lp.input is None:
                    whole = not self.strip_input
                    self.grad = whole_input_grad(lp, b, strip_grad) if whole else strip_grad
                    self.back = i - 1
                    continue
                for t, g in grads_to_return(lp, b, strip_grad):
                    if t.src == b:
                        self.returned[i, b] = g
                    else:
                        sends.append((t.src, i, g.clone()))
                self.awaiting = True
            mine = [t for t in lp.transfers if t.src == b]
            if any((i, t.dst) not in self.returned for t in mine):
                return sends
            got = [(t, self.returned.pop((i, t.dst))) for t in mine]
            self.grad = own_grad(lp, b, piece, got, add_into_own=True)
            self.awaiting, self.back = False, i - 1
        self.done = True
        self.input_grad = self.grad if self.wants_input else None
        self.saved = []
        return sends

    def _edges_backward(self, i: int, lp: LayerPlan, held: _Overlapped) -> list[Send]:
        """The gradients of layer ``i``'s edge outputs: the halos' go back to their owners
        (returned to send), the own part's are kept in the strip's gradient."""
        b = self.block
        assert self.grad is not None and lp.output is not None
        lo = lp.output.ranges[b][0]
        g = self.grad
        n, c = held.parts[0][3].shape[:2]  # the inputs' batch and channels
        strip_grad = g.new_zeros(n, c, held.strip_len)
        grads: list[list[torch.Tensor]] = []
        for pa, pz, out, xin, sliced in held.parts:
            if (pa, pz) == held.inner:
                grads.append([])
                continue
            gx, *gp = torch.autograd.grad(
                out, [xin, *sliced], g.narrow(2, pa - lo, pz - pa), materialize_grads=True
            )
            first = _field(lp, self.layers[i], pa)[0]
            strip_grad.narrow(2, first - held.strip_lo, gx.shape[2]).add_(gx)
            grads.append(gp)
        held.strip_grad = strip_grad
        self._part_grads = grads
        sends: list[Send] = []
        for t, gv in grads_to_return(lp, b, strip_grad):
            if t.src != b:
                sends.append((t.src, i, gv.clone()))
        return sends

    def _interior_backward(self, i: int, lp: LayerPlan, held: _Overlapped) -> None:
        """The gradients of layer ``i``'s interior outputs, added to the own part's; the
        layer's parameter gradients, its parts' laid end to end."""
        b = self.block
        assert self.grad is not None and lp.output is not None and held.strip_grad is not None
        lo = lp.output.ranges[b][0]
        grads = self._part_grads
        for n, (pa, pz, out, xin, sliced) in enumerate(held.parts):
            if (pa, pz) != held.inner:
                continue
            gx, *gp = torch.autograd.grad(
                out, [xin, *sliced], self.grad.narrow(2, pa - lo, pz - pa), materialize_grads=True
            )
            first = _field(lp, self.layers[i], pa)[0]
            held.strip_grad.narrow(2, first - held.strip_lo, gx.shape[2]).add_(gx)
            grads[n] = gp
        # the weight's gradient is in the buffer the parts wrote into; the bias's is small
        self.param_grads[i] = [held.wgrad] + [
            torch.cat([g[j] for g in grads]) if len(grads) > 1 else grads[0][j]
            for j in range(1, len(self.params[i]))
        ]
        own = [t for t in lp.transfers if t.src == t.dst == b]
        for t, gv in grads_to_return(lp, b, held.strip_grad):
            if t in own:
                self.returned[i, b] = gv
        held.parts, self._part_grads = [], []

    def flat_param_grad(self) -> torch.Tensor:
        """The gradients of the block's parameter slices laid end to end, layer by layer, as
        its ranges of the flat parameter space are (:meth:`StagePlan.block_ranges`)."""
        for grads, views in zip(self.param_grads, self._views):
            for g, view in zip(grads, views):
                if g.data_ptr() != view.data_ptr():  # not written in place by its backward
                    view.copy_(g)
        return self._flat


def block_shapes(plan: StagePlan, block: int, layers: Sequence[nn.Module]) -> list[list[Shape]]:
    """Per layer, the shapes of the block's parameter slices (leading dimension its units)."""
    out: list[list[Shape]] = []
    for lp, layer in zip(plan.layers, layers):
        if lp.kind in ("whole", "follow") or lp.output is None:
            out.append([])
            continue
        lo, hi = lp.output.ranges[block]
        out.append([(hi - lo, *p.shape[1:]) for p in layer.parameters()])
    return out


def block_leaves(shapes: Sequence[Sequence[Shape]], flat: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per layer, leaf tensors (requiring grad) viewing ``flat`` in the block's slice
    ``shapes`` (:func:`block_shapes`), in order; ``flat`` must hold exactly that many values."""
    out, offset = [], 0
    for layer_shapes in shapes:
        row = []
        for shape in layer_shapes:
            n = math.prod(shape)
            row.append(flat[offset : offset + n].view(shape).detach().requires_grad_())
            offset += n
        out.append(row)
    if offset != flat.numel():
        raise ValueError(f"a block's slices hold {offset} values, the flat tensor {flat.numel()}")
    return out
