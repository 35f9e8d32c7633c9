"""The processes runtime's profile (``runtime_options={"profile": True}``): where each worker's
time went, per handler and on the wire; the pipeline benchmark's breakdown of it; and what it
led to: the shard's lock per segment (the stages of one replica waited for each other's), and
a stashed forward without ``functional_call``."""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from support import RecordingContext, mlp
from torch import nn

import distbelief
from distbelief.algorithms.downpour.driver import build_layout
from distbelief.algorithms.downpour.messages import (
    Backward,
    ConnectStage,
    Fetch,
    FetchReply,
    Forward,
    Push,
    Snapshot,
    StatsRequest,
)
from distbelief.algorithms.downpour.parameter_shard import ParameterShard
from distbelief.algorithms.downpour.stage import Stage
from distbelief.bench.pipeline import CATEGORIES, breakdown, breakdown_text
from distbelief.core.flat import flatten
from distbelief.core.layout import Layout
from distbelief.errors import ConfigError
from distbelief.runtime import make_runtime


def _run(profile: bool):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)
    return distbelief.train(
        mlp([10, 64, 16, 3]), (x, y), loss="cross_entropy", lr=0.1, batch_size=64, epochs=2,
        stages=2, seed=7, runtime="processes",
        runtime_options={"profile": profile, "processes": 2},
    )  # fmt: skip


@pytest.mark.slow
def test_a_profiled_run_counts_every_handler_in_the_worker_that_ran_it_and_trains_the_same(
    monkeypatch,
):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    plain, profiled = _run(False), _run(True)
    assert "profile" not in plain.stats  # off by default
    # (pipeline_depth 1: one message at a time in the replica, so the run is deterministic)
    assert torch.equal(flatten(plain.model.children()), flatten(profiled.model.children()))
    profile = profiled.stats["profile"]
    steps = profiled.stats["steps"]
    assert set(profile) == {"driver", "worker1", "worker2"}
    assert profile["worker1"]["hosts"] == ["data0", "replica0.stage0"]
    assert profile["worker2"]["hosts"] == ["replica0.stage1"]
    assert profile["driver"]["hosts"] == ["master"]
    first = profile["worker1"]["actors"]
    assert first["replica0.stage0"]["kind"] == "Stage"
    assert first["replica0.stage0"]["handlers"]["Backward"]["n"] == steps
    assert first["data0"]["handlers"]["StepDone"]["n"] == steps
    # The shared shard ran in both workers: each handled its own stage's pushes.
    for worker in ("worker1", "worker2"):
        shard = profile[worker]["actors"]["shard0"]
        assert shard["kind"] == "ParameterShard"
        assert shard["handlers"]["Push"]["n"] == steps
        # Activations one way, their gradients the other: a message each per step, at least.
        assert profile[worker]["send"]["n"] >= steps
        assert profile[worker]["receive"]["n"] >= steps
        assert profile[worker]["lock_held"]["n"] >= steps
        assert profile[worker]["span_s"] > 0
        assert profile[worker]["page_faults"] >= 0
    last = profile["worker2"]["actors"]["replica0.stage1"]["handlers"]
    assert last["Forward"]["n"] == steps
    parts = breakdown(profile)
    assert set(parts) == {"worker1", "worker2"}
    for p in parts.values():
        assert set(CATEGORIES) <= set(p)
        assert p["compute"] > 0 and p["shards"] > 0 and p["wire"] > 0
        assert "compute" in breakdown_text(p)


def test_profile_must_be_true_or_false():
    with pytest.raises(ConfigError, match="^runtime_options: profile must be True or False"):
        make_runtime("processes", profile="yes")


class Busy(Exception):
    """A lock was wanted while another holder had it."""


class NoWaitLock:
    """A lock that raises instead of waiting (and can make siblings, as the processes
    runtime's lock does): a test sees which lock a handler takes while another is held."""

    def __init__(self, name: str = "shard0", made: list | None = None) -> None:
        self.name, self._lock = name, threading.Lock()
        self.made = made if made is not None else [self]

    def sibling(self, part: str) -> NoWaitLock:
        lock = NoWaitLock(f"{self.name} ({part})", self.made)
        self.made.append(lock)
        return lock

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise Busy(self.name)

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_a_shared_shard_locks_each_segment_apart_and_everything_for_a_snapshot():
    layout = Layout.build([3, 5], shards=1)  # two stages' segments in one shard
    shard = ParameterShard(0, torch.ones(8), 0, layout.segments_of_shard(0), "sgd", 0.5)
    ctx = RecordingContext()
    shard.bind(ctx)
    lock = NoWaitLock()
    shard.share_memory(lock)
    shard_lock, first, second = lock.made
    assert [first.name, second.name] == ["shard0 (segment 0)", "shard0 (segment 1)"]
    with second:  # the other stage's process is fetching or pushing segment 1
        shard.on_fetch(Fetch(0, 0), "stage0")
        shard.on_push(Push(0, 0, (torch.ones(3),), 0, True), "stage0")
        with pytest.raises(Busy, match="segment 1"):
            shard.on_fetch(Fetch(0, 1), "stage1")
        with pytest.raises(Busy, match="segment 1"):
            shard.on_snapshot(Snapshot(0), "master")
    ((_, reply),) = ctx.take()
    assert isinstance(reply, FetchReply) and torch.equal(reply.weights, torch.ones(3))
    with shard_lock:  # the counters are the shard's: a stats request waits for nothing else
        with pytest.raises(Busy, match="^shard0$"):
            shard.on_stats_request(StatsRequest(), "master")
    shard.on_push(Push(0, 1, (torch.ones(5),), 0, True), "stage1")
    assert torch.equal(shard.weights, torch.full((8,), 0.5))
    stats = shard.stats()
    assert stats["updates_applied"] == 2 and stats["staleness_histogram"] == [2]


def test_a_stashed_forward_runs_on_its_version_and_puts_the_parameters_back():
    """The forward of a weight-stashed stage (the last of 2) puts its version's tensors in the
    module's place for the call only: its gradients are plain torch's at the fetched values,
    and the module holds its own parameters again afterwards."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)]
    layout = build_layout([[nn.Linear(2, 4)], layers], 1)
    stage = Stage(0, 1, copy.deepcopy(layers), layout.segments_of_stage(1),
                  layout.stage_ranges[1][0], F.cross_entropy, 1, 1, pipeline_depth=2)  # fmt: skip
    assert stage.slots is not None  # (no parameter shared under two names)
    own = [id(p) for p in stage.module.parameters()]
    ctx = RecordingContext("replica0.stage1")
    stage.bind(ctx)
    stage.on_connect(ConnectStage("prev", None, ("shard0",), "data0"), None)
    values = torch.randn(sum(p.numel() for p in stage.params))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    stage.on_forward(Forward(0, x, y), "prev")
    ctx.take()  # the fetch
    stage.on_fetch_reply(FetchReply(0, values, 3), "shard0")
    push, back = (m for _, m in ctx.take())
    assert isinstance(push, Push) and isinstance(back, Backward)
    assert [id(p) for p in stage.module.parameters()] == own
    reference = copy.deepcopy(nn.Sequential(*layers))
    torch.nn.utils.vector_to_parameters(values, reference.parameters())
    xr = x.clone().requires_grad_()
    F.cross_entropy(reference(xr), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    torch.testing.assert_close(torch.cat(push.grads), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(back.grad, xr.grad, rtol=0, atol=1e-6)
