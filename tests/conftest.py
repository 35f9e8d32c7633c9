"""Shared fixtures. ``runtime`` parametrizes engine tests over every runtime that can run here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

RUNTIMES = ["local"]


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """Name of the runtime a test runs on."""
    return request.param


def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, dtype=torch.float32, seed: int = 0):
    """A plain MLP as an nn.Sequential, deterministically initialised."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


@pytest.fixture(scope="session")
def mnist1d_data():
    from distbelief.data import mnist1d

    return mnist1d()
