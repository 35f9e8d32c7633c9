"""Helpers shared by test modules (test modules never import each other; ``conftest.py`` holds
only fixtures): the command run in-process, a recording context that stands in for a runtime,
toy data, the tests' MLP, a checkpoint of fresh shards, and the Ray run helpers."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch
from torch import nn

import distbelief
from distbelief.cli import main

RUNTIMES = ["local", "processes", "ray"]
"""Every runtime; the ``runtime`` fixture (conftest.py) parametrizes over them."""
HAVE_RAY = importlib.util.find_spec("ray") is not None


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command in-process; returns (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """Run the command with ``--json``; it must succeed; returns its last line, parsed."""
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


class RecordingContext:
    """Stands in for a runtime when an actor is stepped one message at a time: records what the
    actor sends (``sent``, a list of ``(ref, message)``); ``take()`` returns it and starts over."""

    def __init__(self, name: str = "master") -> None:
        self.name = self.self_ref = name
        self.sent: list[tuple[object, object]] = []

    def tell(self, ref: object, message: object) -> None:
        self.sent.append((ref, message))

    def take(self) -> list[tuple[object, object]]:
        sent, self.sent = self.sent, []
        return sent


def toy_data(n: int = 256, features: int = 10, classes: int = 3, seed: int = 0):
    """``n`` Gaussian inputs with uniformly random labels (nothing to learn: for runs that check
    mechanics, not accuracy)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def separable_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gaussian inputs in 10 dimensions labelled by the sign of ``x0 + x1``: learnable."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, dtype=torch.float32, seed: int = 0):
    """A plain MLP as an nn.Sequential, deterministically initialised. Not
    :func:`distbelief.models.mlp`: this one takes a dtype and seeds torch's global RNG (which the
    tests' recorded numbers depend on) instead of leaving it as it was."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def logistic(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Multinomial logistic regression on MNIST-1D's 40 inputs, from zero: the convex test's
    model (one optimum, so L-BFGS runs can be compared with each other and with torch's)."""
    model = nn.Sequential(nn.Linear(40, 10, dtype=dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


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


def mnist1d_run(data, **kw):
    """MNIST-1D on Ray with the engine test's setting (MLP 40-256-256-10, Adagrad 0.05, batch
    32, 5 epochs, 2 stages); ``kw`` overrides."""
    train, test = data
    args = dict(loss="cross_entropy", lr=0.05, batch_size=32, epochs=5, stages=2)
    args.update(optimizer="adagrad", eval_data=test, seed=0, runtime="ray")
    args.update(kw)
    return distbelief.train(mlp([40, 256, 256, 10]), train, **args)


def assert_gone(pids: list[int]) -> None:
    """Every process in ``pids`` exits within 30 s (most are gone already)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"processes of the run still alive: {alive}"
