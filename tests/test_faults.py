"""Fault plans: parsing and validation (pure), and every death planned in one process."""

from __future__ import annotations

import copy
import importlib.util
import os
import time

import pytest
import torch
import torch.nn.functional as F
from support import RUNTIMES, mlp

import distbelief
from distbelief.core.flat import flatten
from distbelief.data.inputs import replica_batches
from distbelief.runtime import faults as fault_plans
from distbelief.runtime.faults import Delay, Fault, delay_of, parse, plan, slowed


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


def test_delays_parse_with_a_unit_and_name_what_is_wrong():
    assert parse("delay:shard0=5ms") == Delay("shard0", 0.005)
    assert parse(" delay:replica1=0.2s ") == Delay("replica1", 0.2)
    assert parse("delay:replica0.stage1=250us") == Delay("replica0.stage1", 250e-6)
    assert str(parse("delay:shard0=5ms")) == "delay:shard0=5ms"
    for bad, match in [
        ("delay:shard0=5", "is not delay:ACTOR=DURATION"),
        ("delay:shard0=5min", "is not delay:ACTOR=DURATION"),
        ("delay:shard0@step=3", "is not delay:ACTOR=DURATION"),
        ("delay:shard0=0ms", "more than 0 and at most 60 s"),
        ("delay:shard0=61s", "more than 0 and at most 60 s"),
    ]:
        with pytest.raises(distbelief.ConfigError, match=f"^faults: .*{match}"):
            parse(bad)


def test_a_plan_holds_one_death_and_one_delay_per_actor():
    items = plan(["kill:shard0@update=9", "delay:shard0=1ms", Delay("replica1", 0.5)])
    assert fault_plans.kills(items) == {"shard0": Fault("shard0", "update", 9)}
    assert fault_plans.delays(items) == (Delay("shard0", 0.001), Delay("replica1", 0.5))
    with pytest.raises(distbelief.ConfigError, match="^faults: more than one delay for shard0$"):
        plan(["delay:shard0=1ms", "delay:shard0=2ms"])


def test_a_delay_names_an_actor_or_a_replica_and_the_exact_name_wins():
    items = plan(["delay:replica1=5ms", "delay:replica1.stage1=1s"])
    assert delay_of(items, "replica1.stage0") == 0.005
    assert delay_of(items, "replica1.stage1") == 1.0
    assert delay_of(items, "replica1") == 0.005  # Sandblaster's replica actor
    assert delay_of(items, "replica10.stage0") == 0.0  # a prefix is a whole name part
    assert delay_of(items, "shard1") == 0.0


def test_slowed_handlers_sleep_before_each_message_and_unslowed_ones_are_untouched():
    seen: list = []
    handlers = {int: lambda m, s: seen.append(("handled", m))}
    assert slowed(handlers, 0.0) is handlers
    slow = slowed(handlers, 0.25, sleep=lambda t: seen.append(("slept", t)))
    slow[int](1, None)
    slow[int](2, None)
    assert seen == [("slept", 0.25), ("handled", 1), ("slept", 0.25), ("handled", 2)]


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
        ("delay:shard7=1ms", r"delay:shard7=1ms slows no actor of this run \(actors: "),
        # 128 rows, 1 replica, batch 16, 1 epoch: steps 0..7, 8 pushes to the shard
        (
            "kill:replica0.stage0@step=8",
            "kill:replica0.stage0@step=8 can never fire: its last step is 7 in this run",
        ),
        (
            "kill:shard0@update=9",
            "kill:shard0@update=9 can never fire: it applies at most 8 updates in this run",
        ),
    ],
)
def test_a_plan_that_can_never_fire_is_refused_before_training(runtime, fault, match):
    with pytest.raises(distbelief.ConfigError, match=f"^faults: {match}"):
        run([fault], runtime=runtime)


needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray")


@pytest.mark.parametrize(
    "on, kind",
    [
        ("local", "kill"),
        ("local", "exit"),
        pytest.param("processes", "kill", marks=[pytest.mark.processes, pytest.mark.slow]),
        # the stage's worker crashes: a new worker, forked by the fork server
        pytest.param("processes", "exit", marks=[pytest.mark.processes, pytest.mark.slow]),
        pytest.param("ray", "kill", marks=needs_ray),  # ray.kill of the actor
        pytest.param("ray", "exit", marks=needs_ray),  # the actor's process exits
    ],
)
def test_a_stage_killed_mid_step_is_restarted_and_the_run_equals_the_plain_loop(request, on, kind):
    """One replica, two stages, SGD: the killed stage's step is lost before any push, so the
    restarted replica redoes it from freshly fetched parameters and the result is exact.
    (On processes the two stages run in two workers: a kill rebuilds the stage in its
    worker, an exit replaces the worker.)"""
    if on == "ray":
        request.getfixturevalue("ray_session")
    model = mlp([10, 16, 16, 3])
    x, y = toy()
    result = run([f"{kind}:replica0.stage1@step=5"], model=model, data=(x, y), epochs=2,
                 stages=2, runtime=on)  # fmt: skip
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
    if on == "processes":  # the stage ran alone in worker 2; an exit replaced that worker
        assert result.stats["processes"]["replica0.stage1"] == 2
        assert len(result.stats["worker_pids"]) == 2 + (kind == "exit")
    if on == "ray":  # a new process; the killed one is gone, the rest gone or kept idle
        from support import assert_gone

        from distbelief.runtime.ray.runtime import idle_host_pids

        first, second = result.stats["pids"]["replica0.stage1"]
        assert first != second and first not in idle_host_pids()
        pids = [pid for pids in result.stats["pids"].values() for pid in pids]
        assert_gone([pid for pid in pids if pid not in idle_host_pids()])


def test_stages_killed_by_message_count_in_a_busy_run_all_restart():
    # Two replicas, faults keyed on message counts (a stage's fetch replies, pushes' acks and
    # activations all count): whatever was in flight to the dead stage is lost with it.
    faults = ["kill:replica0.stage0@message=7", "exit:replica1.stage1@message=20"]
    result = run(faults, replicas=2, stages=2, shards=2, epochs=3, optimizer="adagrad")
    assert result.stats["restarts_by_actor"] == {"replica0.stage0": 1, "replica1.stage1": 1}
    assert result.stats["examples"] == 3 * 128
    assert torch.isfinite(flatten(result.model.children())).all()


NO_RESTARTS_LEFT = [("kill:shard1@update=4", "shard1"), ("kill:master@message=3", "master")]


# On Ray a shard without restarts left is test_ray.py's (which also checks nothing is left).
@pytest.mark.parametrize(
    "runtime, fault, actor",
    [
        (rt, fault, actor)
        for rt in RUNTIMES
        for fault, actor in NO_RESTARTS_LEFT
        if rt != "ray" or actor == "master"
    ],
    indirect=["runtime"],
)
def test_an_actor_without_restarts_left_ends_the_run_naming_it(runtime, fault, actor):
    # Shards and the master are recovered (test_recovery.py); not when no restart is left.
    with pytest.raises(distbelief.ActorFailed, match=rf"^actor '{actor}' failed") as info:
        run([fault], shards=2, runtime=runtime, runtime_options={"max_restarts": 0})
    if runtime != "ray":
        assert "no restarts left" in str(info.value)


def test_no_restarts_left_ends_the_run():
    with pytest.raises(distbelief.ActorFailed, match="no restarts left"):
        run(["kill:replica0.stage0@step=2"], runtime_options={"max_restarts": 0})


def test_a_delay_in_one_thread_sleeps_per_message_and_leaves_the_result_bit_for_bit(
    monkeypatch,
):
    """In one thread a delay is a slow machine the whole run shares: the seeded interleaving
    is unchanged, so the result is the undelayed run's exactly; each message to the slowed
    actors (both stages of replica 1) costs one sleep."""
    kw = dict(replicas=2, stages=2, shards=2, epochs=2)
    plain = run(None, **kw)
    naps: list[float] = []
    monkeypatch.setattr(fault_plans, "_sleep", naps.append)
    slow = run(["delay:replica1=3ms"], **kw)
    torch.testing.assert_close(
        flatten(slow.model.children()), flatten(plain.model.children()), rtol=0, atol=0
    )
    # Replica 1 takes 8 steps (128 examples, 2 replicas, batch 16, 2 epochs): each brings
    # each of its 2 stages at least a forward or backward and a fetch reply.
    assert len(naps) >= 8 * 2 * 2 and set(naps) == {0.003}


def test_a_delayed_shard_on_processes_sleeps_in_its_worker_before_each_message(
    monkeypatch, tmp_path
):
    """The workers are forked after the plan is read, so the delayed shard's sleeps happen in
    whichever worker handles its messages: each one appends a line to a file, counted here."""
    naps = tmp_path / "naps"
    fd = os.open(naps, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def sleep(seconds: float) -> None:
        os.write(fd, b"%r\n" % seconds)  # one write each: whole lines, whichever process
        time.sleep(seconds)

    monkeypatch.setattr(fault_plans, "_sleep", sleep)
    try:
        result = run(["delay:shard0=2ms"], replicas=2, shards=2, runtime="processes")
    finally:
        os.close(fd)
    assert result.stats["examples"] == 128
    assert torch.isfinite(flatten(result.model.children())).all()
    # 2 replicas x 4 steps, each a fetch from shard0 and a push to it: 16 messages at least
    # (and control messages), each slept before; shard1 is not slowed.
    slept = naps.read_text().split()
    assert len(slept) >= 2 * 4 * 2 and set(slept) == {"0.002"}, slept


def test_the_counts_a_run_reaches_bound_the_plan():
    from distbelief import DownpourConfig
    from distbelief.algorithms.downpour import driver as downpour

    model = mlp([10, 16, 16, 3])
    stage_layers = [list(model.children())[:2], list(model.children())[2:]]
    layout = downpour.build_layout(stage_layers, 3)
    config = DownpourConfig(lr=0.1, batch_size=16, epochs=2, replicas=2, shards=3, n_push=3)
    most = downpour.most_counts(config, layout, 64, 2)  # 32 rows a replica: 4 steps
    assert most["data1"] == most["replica1.stage1"] == {"step": 3}
    # each replica pushes ceil(4 / 3) = 2 times per stage to each shard holding part of it
    held_by = [{seg.shard for seg in layout.segments_of_stage(s)} for s in range(2)]
    for k in range(3):
        assert most[f"shard{k}"] == {"update": 2 * 2 * sum(k in h for h in held_by)}
    fault_plans.check_reachable([parse("kill:replica1.stage0@step=3")], most)  # the last: fires
    with pytest.raises(distbelief.ConfigError, match="step=4 can never fire: its last step is 3"):
        fault_plans.check_reachable([parse("kill:replica1.stage0@step=4")], most)
    fault_plans.check_reachable([parse("kill:master@message=99999")], most)  # not judged here
