"""The processes runtime's profile (``runtime_options={"profile": True}``): where each worker's
time went, per handler and on the wire; and the pipeline benchmark's breakdown of it."""

from __future__ import annotations

import os

import pytest
import torch
from support import mlp

import distbelief
from distbelief.bench.pipeline import CATEGORIES, breakdown, breakdown_text
from distbelief.core.flat import flatten
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
