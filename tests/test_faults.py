"""Fault plans: parsing and validation (pure), and every death planned in one process."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp

import distbelief
from distbelief.data import replica_batches
from distbelief.flat import flatten
from distbelief.runtime.faults import Fault, parse, plan


def test_text_faults_parse_and_name_what_is_wrong():
    assert parse("kill:shard1@update=500") == Fault("shard1", "update", 500, "kill")
    assert parse(" exit:replica2.stage0@step=100 ") == Fault("replica2.stage0", "step", 100, "exit")
    assert str(parse("kill:master@message=40")) == "kill:master@message=40"
    for bad, match in [
        ("kill shard1", "is not KIND:ACTOR@COUNTER=N"),
        ("stop:shard1@update=5", "unknown kind 'stop'"),
        ("kill:shard1@epoch=5", "unknown counter 'epoch'"),
        ("kill:shard1@update=0", "must be a whole number"),
    ]:
        with pytest.raises(distbelief.ConfigError, match=f"^faults: .*{match}"):
            parse(bad)


def test_plans_take_text_faults_or_the_older_step_mapping_once_per_actor():
    assert plan(None) == ()
    assert plan({"replica1.stage0": 30, "data0": (3, "exit")}) == (
        Fault("replica1.stage0", "step", 30, "kill"),
        Fault("data0", "step", 3, "exit"),
    )
    assert plan(["kill:shard0@update=2"]) == (Fault("shard0", "update", 2),)
    with pytest.raises(distbelief.ConfigError, match="^faults: more than one fault for shard0"):
        plan(["kill:shard0@update=2", "exit:shard0@message=9"])
    with pytest.raises(distbelief.ConfigError, match="^faults: 'data0': unknown kind 'sigstop'"):
        plan({"data0": (3, "sigstop")})


def toy(n: int = 128):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def run(faults, **kw):
    args = dict(loss="cross_entropy", lr=0.1, batch_size=16, epochs=1, seed=0)
    args.update(kw)
    model = args.pop("model", None) or mlp([10, 16, 3])
    opts = {"faults": faults, **args.pop("runtime_options", {})}
    return distbelief.train(model, args.pop("data", None) or toy(), runtime_options=opts, **args)


@pytest.mark.parametrize(
    "fault, match",
    [
        ("kill:shard7@update=3", r"kill:shard7@update=3 names no actor of this run \(actors: "),
        ("kill:data0@update=3", "kill:data0@update=3: data0 applies no updates"),
    ],
)
def test_a_plan_that_can_never_fire_is_refused_before_training(runtime, fault, match):
    with pytest.raises(distbelief.ConfigError, match=f"^faults: {match}"):
        run([fault], runtime=runtime)


def test_a_stage_killed_mid_step_restarts_in_process_and_the_run_equals_the_plain_loop():
    """As on Ray: the killed stage's step is lost before any push, so the restarted replica
    redoes it from freshly fetched parameters and the result is exact."""
    model = mlp([10, 16, 16, 3])
    x, y = toy()
    result = run(["kill:replica0.stage1@step=5"], model=model, data=(x, y), epochs=2, stages=2)
    expected = copy.deepcopy(model)
    opt = torch.optim.SGD(expected.parameters(), lr=0.1)
    for bx, by in replica_batches(x, y, replica=0, seed=0, batch_size=16, epochs=2):
        opt.zero_grad()
        F.cross_entropy(expected(bx), by).backward()
        opt.step()
    torch.testing.assert_close(
        flatten(result.model.children()), flatten(expected.children()), rtol=1e-6, atol=1e-6
    )
    assert result.stats["restarts"] == 1
    assert result.stats["restarts_by_actor"] == {"replica0.stage1": 1}
    assert result.stats["steps"] == 2 * 128 // 16  # the lost step is counted once


def test_stages_killed_by_message_count_in_a_busy_run_all_restart():
    # Two replicas, faults keyed on message counts (a stage's fetch replies, pushes' acks and
    # activations all count): whatever was in flight to the dead stage is lost with it.
    faults = ["kill:replica0.stage0@message=7", "exit:replica1.stage1@message=20"]
    result = run(faults, replicas=2, stages=2, shards=2, epochs=3, optimizer="adagrad")
    assert result.stats["restarts_by_actor"] == {"replica0.stage0": 1, "replica1.stage1": 1}
    assert result.stats["examples"] == 3 * 128
    assert torch.isfinite(flatten(result.model.children())).all()


@pytest.mark.parametrize(
    "fault, actor",
    [("kill:shard1@update=4", "shard1"), ("kill:master@message=3", "master")],
)
def test_an_actor_without_restarts_left_ends_the_run_naming_it(runtime, fault, actor):
    # Shards and the master are recovered (test_recovery.py); not when no restart is left
    # (the processes runtime restarts nothing at all).
    with pytest.raises(distbelief.ActorFailed, match=rf"^actor '{actor}' failed"):
        run([fault], shards=2, runtime=runtime, runtime_options={"max_restarts": 0})


def test_no_restarts_left_ends_the_run():
    with pytest.raises(distbelief.ActorFailed, match="no restarts left"):
        run(["kill:replica0.stage0@step=2"], runtime_options={"max_restarts": 0})
