"""Shared fixtures. ``runtime`` parametrizes engine tests over every runtime that can run here."""

from __future__ import annotations

import importlib.util
import os

# One intra-op thread for torch here and in every process a test starts (Ray workers inherit
# the environment). The tests check correctness, not speed; on a busy 2-core machine torch's
# spinning worker threads made single tests 20-80x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

RUNTIMES = ["local", "processes", "ray"]
HAVE_RAY = importlib.util.find_spec("ray") is not None


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """Name of the runtime a test runs on. Without Ray its cases are skipped, and say so."""
    if request.param == "ray":
        if not HAVE_RAY:
            pytest.skip("ray is not installed (pip install 'distbelief[ray]')")
        request.getfixturevalue("ray_session")
    return request.param


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (token auth, loopback only) shared by the tests that run on Ray:
    starting one costs seconds. Stopped at the end of the session; it leaves nothing behind."""
    from distbelief.runtime.ray.runtime import local_ray

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
    from distbelief.data.inputs import mnist1d

    return mnist1d()


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """Run in an empty temporary directory, so that the command's default run directory
    (``runs/...``) lands there and not in the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _shard_states(model, stages: int, shards: int, optimizer: str, lr: float, version: int):
    """Fresh shards' states as the run would lay them out, their versions set to ``version``."""
    from distbelief.algorithms.downpour.parameter_shard import ParameterShard
    from distbelief.core.flat import flatten, parameters_of
    from distbelief.core.layout import Layout
    from distbelief.core.partition import layer_sizes, resolve_split_points, split_layers
    from distbelief.storage.checkpoint import ShardState

    layers = list(model.children())
    stage_layers = split_layers(layers, resolve_split_points(layer_sizes(layers), stages))
    sizes = [[p.numel() for p in parameters_of(group)] for group in stage_layers]
    layout = Layout.build([sum(s) for s in sizes], shards, [n for s in sizes for n in s])
    initial = flatten(layers)
    out = []
    for k, (a, b) in enumerate(layout.shard_ranges):
        shard = ParameterShard(k, initial[a:b], a, layout.segments_of_shard(k), optimizer, lr)
        state = shard.export_state()
        out.append(
            ShardState(k, state.weights, state.optimizer, dict.fromkeys(state.versions, version))
        )
    return out, layout


def write_checkpoint(directory, model, version: int):
    """A checkpoint of fresh shards of ``model`` (2 stages, 2 shards, Adagrad) at ``version``:
    what a restarted shard may be restored from."""
    from distbelief.storage import checkpoint

    states, layout = _shard_states(model, 2, 2, "adagrad", 0.1, version)
    return checkpoint.save(
        directory, version, states, layout=layout, parameters=[], config={}, positions={}
    )
