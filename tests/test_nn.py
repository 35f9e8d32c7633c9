"""``distbelief.nn``: the locally-connected layers against ``Conv1d`` / ``Conv2d`` with all
their position weights tied to one kernel (the oracle), gradcheck, and their errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distbelief
from distbelief.errors import ConfigError
from distbelief.nn import LocallyConnected1d, LocallyConnected2d

# (kernel, stride, padding, length): sizes that divide evenly and sizes that do not
CASES_1D = [(1, 1, 0, 7), (3, 1, 1, 10), (3, 2, 1, 11), (5, 3, 2, 13), (4, 2, 0, 9), (7, 1, 3, 7)]
CASES_2D = [
    ((3, 3), (1, 1), (1, 1), (6, 7)),
    ((3, 2), (2, 1), (1, 0), (9, 5)),
    ((2, 4), (3, 2), (0, 2), (8, 6)),
    (1, 1, 0, (4, 4)),
    (3, 2, 1, 7),
]


def tied_1d(conv: nn.Conv1d, length: int) -> LocallyConnected1d:
    """A locally-connected layer with ``conv``'s kernel and bias at every position."""
    lc = LocallyConnected1d(conv.in_channels, conv.out_channels, conv.kernel_size[0], length,
                            conv.stride[0], conv.padding[0], dtype=conv.weight.dtype)  # fmt: skip
    with torch.no_grad():
        lc.weight.copy_(conv.weight.reshape(conv.out_channels, -1).expand_as(lc.weight))
        lc.bias.copy_(conv.bias.expand_as(lc.bias))
    return lc


def tied_2d(conv: nn.Conv2d, size: tuple[int, int]) -> LocallyConnected2d:
    lc = LocallyConnected2d(conv.in_channels, conv.out_channels, conv.kernel_size, size,
                            conv.stride, conv.padding, dtype=conv.weight.dtype)  # fmt: skip
    with torch.no_grad():
        lc.weight.copy_(conv.weight.reshape(conv.out_channels, -1).expand_as(lc.weight))
        lc.bias.copy_(conv.bias.expand_as(lc.bias))
    return lc


@pytest.mark.parametrize("kernel, stride, padding, length", CASES_1D)
def test_tied_1d_equals_conv1d_forward_and_backward(kernel, stride, padding, length):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, kernel, stride=stride, padding=padding)
    lc = tied_1d(conv, length)
    x = torch.randn(5, 3, length, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = conv(x), lc(x2)
    assert y2.shape == y.shape
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-6, rtol=0)
    # The conv's kernel gradient is the sum over positions of the untied weights' gradients.
    conv_wgrad = lc.weight.grad.sum(0).reshape(conv.weight.shape)
    torch.testing.assert_close(conv_wgrad, conv.weight.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(lc.bias.grad.sum(0), conv.bias.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel, stride, padding, size", CASES_2D)
def test_tied_2d_equals_conv2d_forward_and_backward(kernel, stride, padding, size):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding)
    size = size if isinstance(size, tuple) else (size, size)
    lc = tied_2d(conv, size)
    x = torch.randn(4, 2, *size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = conv(x), lc(x2)
    assert y2.shape == y.shape and lc.out_size == tuple(y.shape[2:])
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-6, rtol=0)
    conv_wgrad = lc.weight.grad.sum((0, 1)).reshape(conv.weight.shape)
    torch.testing.assert_close(conv_wgrad, conv.weight.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(lc.bias.grad.sum((0, 1)), conv.bias.grad, atol=1e-5, rtol=0)


def test_untied_weights_act_per_position():
    # Position p's output uses weight[p] only: zeroing one position's weights zeroes its output.
    torch.manual_seed(2)
    lc = LocallyConnected1d(2, 3, 3, 8, padding=1, bias=False)
    with torch.no_grad():
        lc.weight[4].zero_()
    y = lc(torch.randn(2, 2, 8))
    assert torch.all(y[:, :, 4] == 0) and torch.all(y[:, :, 3] != 0)


def test_gradcheck_float64():
    from torch.func import functional_call

    torch.manual_seed(3)
    lc1 = LocallyConnected1d(2, 2, 3, 6, stride=2, padding=1, dtype=torch.float64)
    lc2 = LocallyConnected2d(2, 2, (2, 3), (4, 5), stride=(1, 2), padding=(1, 0),
                             dtype=torch.float64)  # fmt: skip
    for lc, shape in ((lc1, (2, 2, 6)), (lc2, (2, 2, 4, 5))):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        w = lc.weight.detach().clone().requires_grad_()
        b = lc.bias.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x, w, b, lc=lc: functional_call(lc, {"weight": w, "bias": b}, (x,)), (x, w, b)
        )


@pytest.mark.parametrize(
    "kernel, stride, pads, length, bias",
    [(3, 1, (1, 0), 7, True), (2, 3, (0, 2), 9, False), (5, 2, (2, 2), 6, True),
     (1, 1, (0, 0), 4, True)],
)  # fmt: skip
def test_local1d_gradcheck_asymmetric_pads_and_strides(kernel, stride, pads, length, bias):
    # local1d's backward is written out (strided adds, not unfold's): a block's asymmetric
    # padding, strides longer than the kernel (positions nobody reads) and no bias.
    from distbelief.nn import local1d, output_length

    torch.manual_seed(4)
    l_out = output_length(length, kernel, stride, *pads)
    x = torch.randn(3, 2, length, dtype=torch.float64, requires_grad=True)
    w = torch.randn(l_out, 4, 2 * kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(l_out, 4, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def f(x, w, b=None):
        return local1d(x, w, b, kernel, stride, pads)

    assert torch.autograd.gradcheck(f, inputs)
    # and it is F.pad + unfold + matmul, as written plainly
    cols = F.pad(x, pads).unfold(2, kernel, stride).permute(0, 2, 1, 3).reshape(3, l_out, -1)
    plain = torch.einsum("nlf,lof->nol", cols, w) + (b.t() if bias else 0)
    torch.testing.assert_close(f(*inputs), plain)


def test_unbatched_input_and_shapes():
    lc = LocallyConnected2d(1, 2, 3, (5, 6), stride=(2, 1))
    assert lc.weight.shape == (2, 4, 2, 9) and lc.bias.shape == (2, 4, 2)
    x = torch.randn(1, 5, 6)
    torch.testing.assert_close(lc(x), lc(x.unsqueeze(0)).squeeze(0))
    lc1 = LocallyConnected1d(2, 3, 2, 5, bias=False)
    assert lc1.bias is None and lc1.weight.shape == (4, 3, 4)
    assert lc1(torch.randn(2, 5)).shape == (3, 4)


def test_initialisation_is_convs_bound():
    torch.manual_seed(4)
    lc = LocallyConnected1d(8, 16, 5, 40)
    bound = 1 / math.sqrt(8 * 5)
    for p in (lc.weight, lc.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    conv = nn.Conv1d(8, 16, 5)  # the same bound as the convolution's default
    assert conv.weight.abs().max() <= bound and conv.bias.abs().max() <= bound


def test_extra_repr_and_exports():
    lc = LocallyConnected1d(3, 4, 5, 20, stride=2, padding=1)
    assert repr(lc) == (
        "LocallyConnected1d(3, 4, kernel_size=5, input_length=20, stride=2, padding=1, "
        "out_length=9, bias=True)"
    )
    assert "out_size=(3, 3)" in repr(LocallyConnected2d(1, 1, 3, 5))
    assert distbelief.LocallyConnected1d is LocallyConnected1d
    assert distbelief.LocallyConnected2d is LocallyConnected2d


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LocallyConnected1d(3, 4, 7, 4, padding=1), "kernel_size 7 is larger than the "
         "padded input length 6"),
        (lambda: LocallyConnected1d(0, 4, 3, 10), "in_channels must be >= 1, got 0"),
        (lambda: LocallyConnected1d(3, 4, 3, 10, stride=0), "stride must be >= 1, got 0"),
        (lambda: LocallyConnected1d(3, 4, 3, 10, padding=-1), "padding must be >= 0, got -1"),
        (lambda: LocallyConnected1d(3, 4, 3.0, 10), "kernel_size must be an integer"),
        (lambda: LocallyConnected2d(1, 1, (3, 9), (5, 6)), "padded input width 6"),
        (lambda: LocallyConnected2d(1, 1, (3, 3, 3), 5), "kernel_size must be an int or a pair"),
        (lambda: LocallyConnected2d(1, 1, 3, (5, -1)), "input_size must be >= 1, got -1"),
    ],
)  # fmt: skip
def test_bad_sizes_are_config_errors_naming_them(make, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_a_wrong_input_shape_names_expected_and_got():
    lc = LocallyConnected1d(3, 4, 3, 10)
    with pytest.raises(ValueError, match=r"expected an input of shape \(N, 3, 10\) or \(3, 10\), "
                       r"got \(2, 3, 11\)"):  # fmt: skip
        lc(torch.randn(2, 3, 11))
    lc2 = LocallyConnected2d(2, 1, 3, (4, 5))
    with pytest.raises(ValueError, match=r"\(N, 2, 4, 5\).*got \(2, 20\)"):
        lc2(torch.randn(2, 20))


def test_usable_in_a_model_spec(tmp_path):
    # A --model file builds a locally-connected net and it takes the data's flat rows.
    from distbelief import models

    (tmp_path / "lcnet.py").write_text(
        "from torch import nn\n"
        "from distbelief.nn import LocallyConnected1d\n"
        "def make(in_features, out_features):\n"
        "    return nn.Sequential(nn.Unflatten(1, (1, in_features)),\n"
        "        LocallyConnected1d(1, 4, 5, in_features, stride=2, padding=2), nn.ReLU(),\n"
        "        nn.Flatten(), nn.Linear(4 * ((in_features + 1) // 2), out_features))\n"
    )
    ms = models.load(str(tmp_path / "lcnet.py") + ":make")
    model = models.build(ms, 40, 10, seed=0)
    models.check_input_width(ms, model, 40)
    assert model(torch.randn(3, 40)).shape == (3, 10)
