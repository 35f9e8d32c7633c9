"""Split a sequential torch model into stages (model parallelism by layer). Pure: no transport."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError


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
    """
    n = len(sizes)
    if not 1 <= stages <= n:
        raise ConfigError(f"stages: {stages} stages need 1..{n} layers, the model has {n}")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][i]: smallest possible max-stage-size splitting layers[:i] into k stages.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                # '<=' prefers the latest start j: trailing parameter-free layers stay behind.
                if cost <= best[k][i]:
                    best[k][i], choice[k][i] = cost, j
    points = []
    i = n
    for k in range(stages, 0, -1):
        i = choice[k][i]
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
