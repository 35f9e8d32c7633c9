"""The Downpour master stepped one decision at a time, and run-level behaviour of train()."""

from __future__ import annotations

import pytest
import torch
from support import RecordingContext, mlp
from torch import nn

import distbelief
from distbelief.algorithms.downpour.master import DownpourMaster
from distbelief.algorithms.downpour.messages import (
    BufferSnapshot,
    ConnectMaster,
    Progress,
    ReplicaDone,
    ShardSnapshot,
    ShardStats,
    Snapshot,
    StageBuffers,
    StartReplica,
    StatsRequest,
    TrainingDone,
    WarmstartDone,
)
from distbelief.algorithms.messages import Begin
from distbelief.errors import ActorFailed, RunTimeout
from distbelief.results import ProgressReport


def stepped_master(replicas=3, warmstart=5, evaluator=None, eval_every=0, buffer_stages=()):
    master = DownpourMaster(replicas, warmstart, 300, evaluator, eval_every, 100)
    ctx = RecordingContext()
    master.bind(ctx)
    data_shards = ("d0", "d1", "d2")[:replicas]
    master.on_connect(ConnectMaster(data_shards, ("s0", "s1"), buffer_stages), None)
    return master, ctx


def test_warmstart_starts_replica_0_alone_then_unleashes_the_others():
    master, ctx = stepped_master()
    master.on_begin(Begin(), "driver")
    assert ctx.take() == [("d0", StartReplica(5))]
    master.on_warmstart_done(WarmstartDone(0), "d0")
    assert ctx.take() == [("d1", StartReplica(0)), ("d2", StartReplica(0))]
    master.on_warmstart_done(WarmstartDone(0), "d0")  # idempotent
    assert ctx.take() == []


def test_without_warmstart_all_replicas_start_together():
    master, ctx = stepped_master(warmstart=0)
    master.on_begin(Begin(), "driver")
    assert [m for _, m in ctx.take()] == [StartReplica(0)] * 3


def test_final_snapshot_is_assembled_in_shard_order_after_every_replica_is_done():
    master, ctx = stepped_master(replicas=2, warmstart=0)
    master.on_begin(Begin(), "driver")
    ctx.take()
    master.on_progress(Progress(0, 10, 150, 15.0), "d0")
    # the report, and a request for each shard's counters (they ride on the next report)
    assert [type(m) for _, m in ctx.take()] == [ProgressReport, StatsRequest, StatsRequest]
    master.on_replica_done(ReplicaDone(0, 10, 150, ({},)), "d0")
    assert ctx.take() == []
    master.on_replica_done(ReplicaDone(1, 10, 150, ({},)), "d1")
    asks = ctx.take()
    assert asks == [("s0", Snapshot(-1)), ("s1", Snapshot(-1))]
    stats = {"updates_applied": 1, "rejected_pushes": 0, "staleness_sum": 0, "staleness_max": 0}
    master.on_shard_snapshot(ShardSnapshot(1, -1, torch.tensor([3.0, 4.0]), stats), "s1")
    assert ctx.take() == []
    master.on_shard_snapshot(ShardSnapshot(0, -1, torch.tensor([1.0, 2.0]), stats), "s0")
    ((to, done),) = ctx.take()
    assert to == "driver" and isinstance(done, TrainingDone)
    assert torch.equal(done.weights, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert done.examples == 300 and done.steps == 20


STATS = {"updates_applied": 0, "rejected_pushes": 0, "staleness_sum": 0, "staleness_max": 0}


def evaluating_master(buffer_stages=()):
    """One replica, evaluated every 100 examples; returns master, ctx and what was evaluated."""
    evaluated = []
    master, ctx = stepped_master(
        replicas=1,
        warmstart=0,
        evaluator=lambda w, b: evaluated.append((w, b)) or {"loss": 0.0},
        eval_every=100,
        buffer_stages=buffer_stages,
    )
    master.on_begin(Begin(), "driver")
    ctx.take()
    return master, ctx, evaluated


def test_evaluation_is_requested_every_eval_every_examples():
    master, ctx, evaluated = evaluating_master()
    master.on_progress(Progress(0, 5, 50, 5.0), "d0")
    assert not [m for _, m in ctx.take() if isinstance(m, Snapshot)]
    master.on_progress(Progress(0, 5, 60, 5.0), "d0")
    snaps = [m for _, m in ctx.take() if isinstance(m, Snapshot)]
    assert snaps == [Snapshot(1), Snapshot(1)]
    for k in range(2):
        master.on_shard_snapshot(ShardSnapshot(k, 1, torch.zeros(2), STATS), f"s{k}")
    assert len(evaluated) == 1 and master.history["eval"][0]["examples"] == 110
    assert evaluated[0][1] == {}  # no stage with buffers: none asked for


def test_an_evaluation_waits_for_replica_0s_buffers_too():
    master, ctx, evaluated = evaluating_master(buffer_stages=("r0.stage1",))
    master.on_progress(Progress(0, 10, 100, 5.0), "d0")
    asks = [(to, m) for to, m in ctx.take() if not isinstance(m, (ProgressReport, StatsRequest))]
    assert asks == [("s0", Snapshot(1)), ("s1", Snapshot(1)), ("r0.stage1", BufferSnapshot(1))]
    for k in range(2):
        master.on_shard_snapshot(ShardSnapshot(k, 1, torch.tensor([float(k)]), STATS), f"s{k}")
    assert evaluated == []  # the buffers are not in yet
    mean = {"1.running_mean": torch.ones(3)}
    master.on_stage_buffers(StageBuffers(1, 1, mean), "r0.stage1")
    ((weights, buffers),) = evaluated
    assert torch.equal(weights, torch.tensor([0.0, 1.0]))
    assert list(buffers) == [1] and buffers[1] is mean


def test_reports_carry_each_replica_the_shards_counters_and_evaluations():
    master, ctx = stepped_master(
        replicas=2, warmstart=0, evaluator=lambda w, b: {"loss": 0.5}, eval_every=200
    )
    master.on_begin(Begin(), "driver")
    ctx.take()
    master.on_progress(Progress(1, 10, 150, 20.0), "d1")
    (report,) = [m for _, m in ctx.take() if isinstance(m, ProgressReport)]
    assert report.replica_steps == (0, 10) and report.replica_examples == (0, 150)
    assert report.replica_loss == (None, 2.0) and report.shard_stats == ()
    hist = {**STATS, "updates_applied": 3, "staleness_sum": 2, "staleness_histogram": [1, 2]}
    master.on_shard_stats(ShardStats(1, hist), "s1")
    master.on_shard_stats(ShardStats(0, STATS), "s0")
    master.on_progress(Progress(0, 8, 120, 8.0), "d0")  # 270 examples: an evaluation too
    msgs = [m for _, m in ctx.take()]
    (report,) = [m for m in msgs if isinstance(m, ProgressReport)]
    assert report.replica_examples == (120, 150) and report.replica_loss == (1.0, None)
    assert [s["staleness_histogram"] for s in report.shard_stats[1:]] == [[1, 2]]
    assert report.evaluation is None
    for k in range(2):
        master.on_shard_snapshot(ShardSnapshot(k, 1, torch.zeros(2), STATS), f"s{k}")
    (to, announced), *_ = ctx.take()
    assert to == "driver" and announced.evaluation == {"loss": 0.5}
    assert announced.examples == 270


# ------------------------------------------------------------------ through train()


class FailsOnCall(nn.Module):
    """Identity that raises on its `n`-th call (the dry run is call 1)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("layer exploded")
        return x


def data(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_an_actor_error_ends_the_run_naming_the_actor():
    model = nn.Sequential(nn.Linear(10, 8), FailsOnCall(4), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ActorFailed, match=r"replica0\.stage1.*layer exploded"):
        distbelief.train(
            model, data(), loss="cross_entropy", lr=0.1, batch_size=8, epochs=1, stages=[1, 3]
        )


def test_periodic_evaluation_and_loss_history():
    x, y = data(256)
    result = distbelief.train(
        mlp([10, 16, 3]),
        (x, y),
        loss="cross_entropy",
        lr=0.1,
        batch_size=8,
        epochs=2,
        replicas=2,
        eval_data=(x[:64], y[:64]),
        eval_every=128,
        seed=0,
    )
    evals = result.history.eval
    # Progress arrives in windows of a few steps, so an evaluation happens at the first
    # report past each multiple of eval_every; then one more at the end.
    assert len(evals) == 4
    for k, e in enumerate(evals[:3], start=1):
        assert 128 * k <= e["examples"] < 128 * (k + 1)
    assert evals[-1]["examples"] == 512
    with torch.no_grad():  # the last one is of the returned model
        right = (result.model(x[:64]).argmax(1) == y[:64]).float().mean().item()
    assert evals[-1]["accuracy"] == pytest.approx(right)
    train = result.history.train
    assert train[-1]["examples"] == 512
    assert all(a["examples"] < b["examples"] for a, b in zip(train, train[1:]))
    assert all(a["wall_s"] <= b["wall_s"] for a, b in zip(train, train[1:]))


def test_a_drawn_seed_is_recorded_and_reproduces_the_run():
    x, y = data(128)
    kw = dict(loss="cross_entropy", lr=0.1, batch_size=8, epochs=1, replicas=3, shards=2)
    first = distbelief.train(mlp([10, 16, 3]), (x, y), **kw)
    seed = first.config.seed
    assert isinstance(seed, int) and first.stats["seed"] == seed
    again = distbelief.train(mlp([10, 16, 3]), (x, y), seed=seed, **kw)
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_a_run_past_its_timeout_stops_with_an_error():
    with pytest.raises(RunTimeout, match="timeout"):
        distbelief.train(
            mlp([10, 16, 3]),
            data(2048),
            loss="cross_entropy",
            lr=0.1,
            batch_size=1,
            epochs=1,
            timeout_s=1e-6,
        )
