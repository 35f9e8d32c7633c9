"""Recovery promises of the README not covered in test_recovery.py: an actor dying while an
evaluation during training waits for it (the evaluation still happens), and ``max_restarts``
bounding the restarts of each actor, not of the run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support import mlp
from torch import nn

import distbelief
from distbelief.algorithms.downpour.messages import BufferSnapshot, Snapshot
from distbelief.runtime.faults import Fault

EVERY = 64  # examples between evaluations; 2 replicas x 3 epochs of 256 examples: 768


@dataclasses.dataclass(frozen=True)
class AtEvaluation(Fault):
    """Kills ``actor`` instead of handling the ``count``-th evaluation's request for its
    parameters (a shard) or its buffers (one of replica 0's stages): the request is lost
    with it, as the plan language cannot aim (it counts steps, updates and messages)."""

    def due(self, message: object, delivered: int, actor: object) -> bool:
        asks = isinstance(message, (Snapshot, BufferSnapshot))
        return asks and message.tag == self.count  # evaluations are tagged 1, 2, ...


def toy(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def with_batchnorm() -> nn.Sequential:
    """Buffers in both stages: an evaluation asks replica 0's stages for theirs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3),
    )  # fmt: skip


def run(
    model: nn.Sequential, faults: list, runtime: str = "local", **options
) -> distbelief.TrainResult:
    return distbelief.train(
        model, toy(256), eval_data=toy(64, seed=1), loss="cross_entropy", lr=0.1,
        batch_size=16, epochs=3, replicas=2, stages=2, shards=2, optimizer="adagrad",
        eval_every=EVERY, seed=0, runtime=runtime, runtime_options={"faults": faults, **options},
    )  # fmt: skip


@pytest.mark.parametrize(
    "actor, evaluation",
    [("shard0", 1), ("shard1", 3), ("replica0.stage0", 1), ("replica0.stage1", 4)],
)
def test_an_actor_dying_while_an_evaluation_waits_for_it_loses_no_evaluation(actor, evaluation):
    """The request dies with the actor; the restarted one is asked again. Every interval of
    ``eval_every`` examples still has its evaluation, as in the run without the fault."""
    result = run(with_batchnorm(), [AtEvaluation(actor, "message", evaluation)])
    assert result.stats["restarts_by_actor"] == {actor: 1}
    seen = [e["examples"] for e in result.history.eval]
    assert seen[-1] == 768  # the final one
    assert [n // EVERY for n in seen[:-1]] == list(range(1, 768 // EVERY))
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result.history.eval)


@pytest.mark.parametrize(
    "runtime", ["local", pytest.param("processes", marks=[pytest.mark.processes, pytest.mark.slow])]
)
def test_max_restarts_bounds_each_actor_not_the_run(runtime):
    """``max_restarts=1``: a stage and a shard each die once, and each is restarted (the
    bound is per actor); with ``max_restarts=0`` the first death ends the run naming it."""
    faults = ["kill:replica1.stage0@step=5", "kill:shard1@update=40"]
    result = run(mlp([10, 16, 16, 3]), faults, runtime, max_restarts=1)
    assert result.stats["restarts_by_actor"] == {"replica1.stage0": 1, "shard1": 1}
    assert result.stats["examples"] == 768
    with pytest.raises(distbelief.ActorFailed, match="^actor 'replica1.stage0' failed.*no rest"):
        run(mlp([10, 16, 16, 3]), ["kill:replica1.stage0@step=5"], runtime, max_restarts=0)
