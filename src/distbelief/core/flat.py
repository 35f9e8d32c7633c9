"""Parameters as views into one flat buffer, so a fetch is one ``copy_`` and a push one tensor."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def parameters_of(layers: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Parameters of the layers in layout order, each once."""
    seen: set[int] = set()
    out = []
    for layer in layers:
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def flatten(layers: Iterable[nn.Module]) -> torch.Tensor:
    """A new 1-D tensor holding the layers' parameters end to end."""
    params = parameters_of(layers)
    if not params:
        return torch.zeros(0)
    return torch.cat([p.detach().reshape(-1) for p in params])


def bind_to_flat(layers: Iterable[nn.Module], buffer: torch.Tensor) -> torch.Tensor:
    """Re-point every parameter at a view of one flat buffer, and return the buffer.

    If ``buffer`` holds as many elements as the parameters, the parameters take its values;
    if it is empty, a new buffer of its dtype is made holding the parameters' current values.
    Writing into the buffer (a fetch, a local step) then changes the parameters in place.
    """
    params = parameters_of(layers)
    if buffer.numel() == 0 and params:
        buffer = torch.cat([p.detach().reshape(-1) for p in params]).to(buffer.dtype)
    n = sum(p.numel() for p in params)
    if buffer.numel() != n:
        raise ValueError(f"flat buffer has {buffer.numel()} elements, the layers need {n}")
    offset = 0
    for p in params:
        k = p.numel()
        p.data = buffer[offset : offset + k].view_as(p)
        offset += k
    return buffer


def load_flat(layers: Iterable[nn.Module], vector: torch.Tensor) -> None:
    """Copy a flat vector into the layers' parameters (layout order)."""
    offset = 0
    with torch.no_grad():
        for p in parameters_of(layers):
            k = p.numel()
            p.copy_(vector[offset : offset + k].view_as(p))
            offset += k
    if offset != vector.numel():
        raise ValueError(f"flat vector has {vector.numel()} elements, the layers need {offset}")
