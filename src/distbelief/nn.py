"""Locally-connected layers: convolutions whose weights are not shared between output positions.

The paper's image models are locally connected: each output unit sees a small window of the
input, as in a convolution, but every output position has weights of its own. That is what
makes them split well across machines (a block of output positions needs only a thin halo of
its neighbours' input; see ``core/blocks.py`` and docs/partitions.md).

:class:`LocallyConnected1d` and :class:`LocallyConnected2d` take the arguments of
``nn.Conv1d`` / ``nn.Conv2d`` (channels, kernel size, stride, zero padding, bias) plus the
input's spatial size, which fixes how many output positions, and so how many weights, there
are. Forward is one ``unfold`` (every receptive field as a row) and one batched matmul over
positions (``einsum``); autograd derives the backward pass from them, so neither loops over
positions in Python.

**Parameter layout.** The output position is the *leading* dimension of every parameter:

- 1-D: ``weight`` is ``(out_length, out_channels, in_channels * kernel_size)``, ``bias``
  ``(out_length, out_channels)``;
- 2-D: ``weight`` is ``(out_height, out_width, out_channels, in_channels * kh * kw)``, ``bias``
  ``(out_height, out_width, out_channels)``.

So a block of consecutive output positions (1-D), or of consecutive output rows (2-D), owns a
contiguous slice of each parameter, hence a contiguous range of the flat parameter space, as
``nn.Linear``'s block of output units owns rows of its weight. The last weight dimension is
ordered as a convolution's flattened kernel (input channel, then kernel row, then kernel
column): ``weight[p]`` reshaped to ``(out_channels, in_channels, *kernel_size)`` is the
convolution kernel the layer applies at position ``p``.

**Initialisation** is a convolution's default: weight and bias uniform in
``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` with ``fan_in = in_channels * kernel elements``, the
inputs of one receptive field (what ``kaiming_uniform_(a=sqrt(5))`` gives a conv kernel).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

Pair = tuple[int, int]


def _positive(name: str, layer: str, value: object, *, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{layer}: {name} must be an integer, got {value!r}")
    if value < (0 if zero_ok else 1):
        raise ConfigError(f"{layer}: {name} must be {'>= 0' if zero_ok else '>= 1'}, got {value}")
    return value


def _pair(name: str, layer: str, value: object, *, zero_ok: bool = False) -> Pair:
    """An int or a pair of ints, as a pair, each checked."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(f"{layer}: {name} must be an int or a pair, got {value!r}")
        a, b = value
    else:
        a = b = value
    return (
        _positive(name, layer, a, zero_ok=zero_ok),
        _positive(name, layer, b, zero_ok=zero_ok),
    )


def output_length(length: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    """Number of output positions along one axis: ``(L + pads - kernel) // stride + 1``."""
    return (length + pad_before + pad_after - kernel) // stride + 1


def _out_length(layer: str, axis: str, length: int, kernel: int, stride: int, pad: int) -> int:
    if kernel > length + 2 * pad:
        raise ConfigError(
            f"{layer}: kernel_size {kernel} is larger than the padded input {axis} "
            f"{length + 2 * pad} ({length} + 2 x padding {pad})"
        )
    return output_length(length, kernel, stride, pad, pad)


def _init(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    # Conv's default (kaiming_uniform_ with a=sqrt(5) on the kernel, and its bias rule) comes to
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both; torch's fan-in helper would misread our
    # position-major shapes, so the bound is written out.
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


class _Local1d(torch.autograd.Function):
    """The locally-connected 1-D pass with its backward written out, in position-major layout.

    Every tensor is laid out ``(position, N, channels)`` inside: the padded input is one copy
    of ``x`` (zeros at the pads; none where ``x`` is position-major already and comes padded,
    as a block's strip does), its receptive fields one strided view of it made contiguous
    once, the output one batched matmul (with the bias added in it), returned as an
    ``(N, C_out, L_out)`` view of ``(L_out, N, C_out)`` memory. The next layer's permute to
    position-major is then free, and element-wise layers between keep that layout. The
    backward is two batched matmuls and ``kernel_size`` strided adds into the padded input's
    gradient, in place of ``unfold``'s generic backward (a scatter), which took about a sixth
    of a step. With ``wgrad_into``, the weight's gradient is written into that tensor (a
    slice of a buffer: a block computing its outputs in parts fills one gradient, no copy).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kernel_size: int,
        stride: int,
        padding: Pair,
        wgrad_into: torch.Tensor | None,
    ) -> torch.Tensor:
        n, c, length = x.shape
        before, after = padding
        xp = x.permute(2, 0, 1)
        if before == after == 0 and xp.is_contiguous():
            padded = xp  # already position-major (a block's strip with its padding in it)
        else:
            padded = x.new_empty(length + before + after, n, c)
            padded[:before].zero_()
            padded[before + length :].zero_()
            padded[before : before + length] = xp
        cols = padded.unfold(0, kernel_size, stride)  # (L_out, N, C_in, k): a view
        l_out = cols.shape[0]
        cols = cols.reshape(l_out, n, c * kernel_size)  # a copy, the fields' order as weight's
        wt = weight.transpose(1, 2)
        out = torch.bmm(cols, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), cols, wt)
        ctx.save_for_backward(cols, weight)
        ctx.geometry = (n, c, length, kernel_size, stride, before, bias is not None)
        ctx.wgrad_into = wgrad_into
        return out.permute(1, 2, 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        cols, weight = ctx.saved_tensors
        n, c, length, k, stride, before, has_bias = ctx.geometry
        # (L_out, N, C_out), made contiguous: a gradient of a slice of the output (a block's
        # part) would send bmm down a per-matrix loop
        g = grad.permute(2, 0, 1).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            into = ctx.wgrad_into
            grad_w = torch.bmm(g.transpose(1, 2), cols, out=into) if into is not None else None
            grad_w = torch.bmm(g.transpose(1, 2), cols) if grad_w is None else grad_w
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(1)
        if ctx.needs_input_grad[0]:
            l_out = g.shape[0]
            gcols = torch.bmm(g, weight).view(l_out, n, c, k)
            span = stride * (l_out - 1) + 1
            size = max(length + before, span + k - 1)
            if stride == 1:  # offset 0 covers [0, span): written, not added to zeros
                padded = gcols.new_empty(size, n, c)
                padded[:span] = gcols[:, :, :, 0]
                padded[span:].zero_()
                first = 1
            else:
                padded, first = gcols.new_zeros(size, n, c), 0
            for j in range(first, k):  # each kernel offset's gradient to the positions it read
                padded[j : j + span : stride].add_(gcols[:, :, :, j])
            grad_x = padded[before : before + length].permute(1, 2, 0)
        return grad_x, grad_w, grad_b, None, None, None, None


def local1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: int,
    stride: int,
    padding: Pair = (0, 0),
    wgrad_into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Locally-connected 1-D forward: ``x`` ``(N, C_in, L)`` zero-padded by ``padding``
    (before, after), ``weight`` ``(L_out, C_out, C_in * kernel_size)``, ``bias`` ``(L_out,
    C_out)`` or None; returns ``(N, C_out, L_out)`` (a view of position-major memory; see
    :class:`_Local1d`). ``L_out`` must be what the padded input gives (a block passes its own
    strip and padding; see ``core/blocks.py``). Differentiable in all three tensors. With
    ``wgrad_into`` (contiguous, the weight's shape) the backward writes the weight's gradient
    into it and returns it."""
    return _Local1d.apply(x, weight, bias, kernel_size, stride, tuple(padding), wgrad_into)


def local2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: Pair,
    stride: Pair,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> torch.Tensor:
    """Locally-connected 2-D forward: ``x`` ``(N, C_in, H, W)`` zero-padded by ``padding``
    (left, right, top, bottom, as ``F.pad`` orders them), ``weight`` ``(H_out, W_out, C_out,
    C_in * kh * kw)``, ``bias`` ``(H_out, W_out, C_out)`` or None; returns ``(N, C_out, H_out,
    W_out)``."""
    left, right, top, bottom = padding
    if left == right and top == bottom:
        cols = F.unfold(x, kernel_size, padding=(top, left), stride=stride)
    else:
        cols = F.unfold(F.pad(x, padding), kernel_size, stride=stride)
    h_out, w_out, c_out, fan_in = weight.shape
    # cols: (N, C_in*kh*kw, H_out*W_out), the position index row-major as weight's first two dims
    out = torch.einsum("nfl,lof->nol", cols, weight.reshape(h_out * w_out, c_out, fan_in))
    if bias is not None:
        out = out + bias.reshape(h_out * w_out, c_out).t()
    return out.reshape(out.shape[0], c_out, h_out, w_out)


def _check_input(layer: nn.Module, x: torch.Tensor, expected: tuple[int, ...]) -> bool:
    """Whether ``x`` is unbatched; a shape that is neither ``(N, *expected)`` nor
    ``expected`` is a ValueError naming both."""
    if tuple(x.shape[1:]) == expected and x.dim() == len(expected) + 1:
        return False
    if tuple(x.shape) == expected:
        return True
    shape = ", ".join(str(d) for d in expected)
    raise ValueError(
        f"{type(layer).__name__}: expected an input of shape (N, {shape}) or ({shape}), "
        f"got {tuple(x.shape)}"
    )


class LocallyConnected1d(nn.Module):
    """A 1-D convolution with untied weights: a kernel of its own at every output position.

    Input ``(N, in_channels, input_length)`` (or unbatched ``(in_channels, input_length)``),
    output ``(N, out_channels, out_length)`` with ``out_length = (input_length + 2 * padding -
    kernel_size) // stride + 1``. Zero padding. Parameters (see the module doc): ``weight``
    ``(out_length, out_channels, in_channels * kernel_size)``, ``bias`` ``(out_length,
    out_channels)``. Bad sizes are a ``ConfigError`` naming the argument.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_length: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = _positive("in_channels", name, in_channels)
        self.out_channels = _positive("out_channels", name, out_channels)
        self.kernel_size = _positive("kernel_size", name, kernel_size)
        self.input_length = _positive("input_length", name, input_length)
        self.stride = _positive("stride", name, stride)
        self.padding = _positive("padding", name, padding, zero_ok=True)
        self.out_length = _out_length(name, "length", input_length, kernel_size, stride, padding)
        fan_in = in_channels * kernel_size
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_length, out_channels, fan_in, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_length, out_channels, **kw)) if bias else None
        _init(self.weight, self.bias, fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = _check_input(self, x, (self.in_channels, self.input_length))
        if unbatched:
            x = x.unsqueeze(0)
        p = self.padding
        out = local1d(x, self.weight, self.bias, self.kernel_size, self.stride, (p, p))
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_length={self.input_length}, stride={self.stride}, padding={self.padding}, "
            f"out_length={self.out_length}, bias={self.bias is not None}"
        )


class LocallyConnected2d(nn.Module):
    """A 2-D convolution with untied weights: a kernel of its own at every output position.

    Input ``(N, in_channels, H, W)`` (or unbatched ``(in_channels, H, W)``) with ``(H, W) =
    input_size``; output ``(N, out_channels, H_out, W_out)``, each axis as a ``Conv2d``'s.
    ``kernel_size``, ``stride``, ``padding`` and ``input_size`` are ints or (height, width)
    pairs; zero padding. Parameters (see the module doc): ``weight`` ``(H_out, W_out,
    out_channels, in_channels * kh * kw)``, ``bias`` ``(H_out, W_out, out_channels)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Pair,
        input_size: int | Pair,
        stride: int | Pair = 1,
        padding: int | Pair = 0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = _positive("in_channels", name, in_channels)
        self.out_channels = _positive("out_channels", name, out_channels)
        self.kernel_size = _pair("kernel_size", name, kernel_size)
        self.input_size = _pair("input_size", name, input_size)
        self.stride = _pair("stride", name, stride)
        self.padding = _pair("padding", name, padding, zero_ok=True)
        self.out_size = tuple(
            _out_length(name, axis, *args)
            for axis, *args in zip(
                ("height", "width"), self.input_size, self.kernel_size, self.stride, self.padding
            )
        )
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(*self.out_size, out_channels, fan_in, **kw))
        self.bias = nn.Parameter(torch.empty(*self.out_size, out_channels, **kw)) if bias else None
        _init(self.weight, self.bias, fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = _check_input(self, x, (self.in_channels, *self.input_size))
        if unbatched:
            x = x.unsqueeze(0)
        ph, pw = self.padding
        out = local2d(x, self.weight, self.bias, self.kernel_size, self.stride, (pw, pw, ph, ph))
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_size={self.input_size}, stride={self.stride}, padding={self.padding}, "
            f"out_size={self.out_size}, bias={self.bias is not None}"
        )
