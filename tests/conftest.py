"""Shared fixtures. ``runtime`` parametrizes engine tests over every runtime that can run here."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

RUNTIMES = ["local", *(["ray"] if importlib.util.find_spec("ray") else [])]


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """Name of the runtime a test runs on."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    return request.param


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (token auth, loopback only) shared by the tests that run on Ray:
    starting one costs seconds. Stopped at the end of the session; it leaves nothing behind."""
    from distbelief.runtime.ray import local_ray

    with local_ray():
        yield


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
