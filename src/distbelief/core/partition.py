"""Split a sequential torch model into stages (model parallelism by layer). Pure: no transport."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError


def as_layers(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The model's layers in order: the children of an ``nn.Sequential`` or a list of modules."""
    if isinstance(model, nn.Sequential):
        layers = list(model)
    elif isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        layers = list(model)
    else:
        raise ConfigError(
            f"model: expected an nn.Sequential or a list of nn.Module, got {type(model).__name__}"
        )
    if not layers:
        raise ConfigError("model: the model has no layers")
    return layers


def layer_sizes(layers: Sequence[nn.Module]) -> list[int]:
    """Number of parameters each layer owns; a parameter shared by two layers is an error."""
    seen: dict[int, int] = {}
    sizes = []
    for i, layer in enumerate(layers):
        n = 0
        for p in layer.parameters():
            if id(p) in seen and seen[id(p)] != i:
                raise ConfigError(
                    f"model: layers {seen[id(p)]} and {i} share a parameter; tied weights "
                    "across layers are not supported"
                )
            seen[id(p)] = i
            n += p.numel()
        sizes.append(n)
    return sizes


def balanced_split_points(sizes: Sequence[int], stages: int) -> list[int]:
    """Split points (indices where stages 1.. start) minimising the largest stage's size.

    Every stage gets at least one layer. Ties go to the split that puts parameter-free layers
    (activations) with the layer before them, so ``Linear, ReLU`` stay together.

    The dynamic programme ``best[k][i] = min_j max(best[k-1][j], size(j..i))`` is computed one
    stage count at a time over all ``i`` at once: ``best[k-1]`` is non-decreasing in ``j`` and
    ``size(j..i)`` non-increasing, so the minimum sits where they cross, found by a binary
    search (numpy ``searchsorted``) instead of a scan over every ``j``. A 1,000-layer model
    splits into 100 stages in milliseconds instead of minutes.
    """
    n = len(sizes)
    if not 1 <= stages <= n:
        raise ConfigError(f"stages: {stages} stages need 1..{n} layers, the model has {n}")
    prefix = np.concatenate(([0], np.cumsum(np.asarray(sizes, dtype=np.int64))))
    # choice[k][i]: where the k-th stage starts when layers[:i] are split into k stages;
    # best: the smallest largest-stage size for each i at the current k.
    ends = np.arange(1, n - stages + 2)  # k = 1: layers[:i] in one stage, i = 1..n-stages+1
    best = prefix[ends]
    choice = [None, np.zeros(len(ends), dtype=np.int64)]
    for k in range(2, stages + 1):
        # Previous row covers j = k-1 .. n-stages+k-1; this row i = k .. n-stages+k.
        j0 = k - 1
        f = best
        h = f + prefix[j0 : j0 + len(f)]  # f(j) >= size(j..i)  <=>  h(j) >= prefix[i]
        i = np.arange(k, n - stages + k + 1)
        last = i - 1 - j0  # the latest start j = i - 1, as an index into f
        # a: the first j whose previous best reaches the last stage's size (clipped to i - 1 + 1).
        a = np.minimum(np.searchsorted(h, prefix[i], side="left"), last + 1)
        has_a = a <= last
        fa = f[np.minimum(a, last)]
        g_before = prefix[i] - prefix[j0 + np.maximum(a - 1, 0)]  # cost of starting at a - 1
        use_a = has_a & ((a == 0) | (fa <= g_before))
        # Among the ties at f(a), the DP takes the latest start (trailing free layers stay).
        b = np.minimum(np.searchsorted(f, fa, side="right") - 1, last)
        best = np.where(use_a, fa, g_before)
        choice.append(np.where(use_a, b, a - 1) + j0)
    points = []
    i = n
    for k in range(stages, 0, -1):
        i = int(choice[k][i - k])
        points.append(i)
    points.reverse()
    return points[1:]


def resolve_split_points(sizes: Sequence[int], stages: int | Sequence[int]) -> list[int]:
    """Turn ``stages`` (a count, or explicit split points) into validated split points."""
    n = len(sizes)
    if isinstance(stages, bool) or not isinstance(stages, (int, list, tuple)):
        raise ConfigError(f"stages: expected a count or a list of split points, got {stages!r}")
    if isinstance(stages, int):
        if stages < 1:
            raise ConfigError(f"stages: must be >= 1, got {stages}")
        if stages > n:
            raise ConfigError(f"stages: {stages} stages but the model has only {n} layers")
        return balanced_split_points(sizes, stages)
    points = list(stages)
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in points):
        raise ConfigError(f"stages: split points must be integers, got {stages!r}")
    if points != sorted(set(points)) or (points and (points[0] < 1 or points[-1] > n - 1)):
        raise ConfigError(
            f"stages: split points {points} must be strictly increasing within 1..{n - 1}"
        )
    return points


def split_layers(layers: Sequence[nn.Module], points: Sequence[int]) -> list[list[nn.Module]]:
    """Group layers into stages at the given split points."""
    bounds = [0, *points, len(layers)]
    return [list(layers[bounds[s] : bounds[s + 1]]) for s in range(len(bounds) - 1)]


def model_dtype(layers: Sequence[nn.Module]) -> torch.dtype:
    """The one floating dtype of all parameters (a float64 model trains in float64)."""
    dtypes = {p.dtype for layer in layers for p in layer.parameters()}
    if not dtypes:
        raise ConfigError("model: the model has no parameters to train")
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d) for d in dtypes))
        raise ConfigError(f"model: parameters have mixed dtypes ({names}); use one dtype")
    (dtype,) = dtypes
    if not dtype.is_floating_point:
        raise ConfigError(f"model: parameters must be floating point, got {dtype}")
    return dtype


def edits_its_input(layers: Sequence[nn.Module]) -> bool:
    """Whether the first leaf module of these layers may change its input in place (e.g.
    ``ReLU(inplace=True)``): a stage or an evaluation then feeds it a copy, since its input is
    a message's tensor or the user's data (read-only), or a leaf autograd must not see edited."""
    for layer in layers:
        for module in layer.modules():
            if not any(True for _ in module.children()):
                return bool(getattr(module, "inplace", False))
    return False
