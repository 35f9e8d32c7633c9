"""Recovery of a dead parameter shard, data shard or master: the choice of sources (pure), the
restarted shard holding messages back, and whole runs with planned deaths (in one process,
and some on processes, where the interleaving is not seeded: they check what every run
shares; the Ray runs are in test_ray.py)."""

from __future__ import annotations

import pytest
import torch
from support import RecordingContext, mlp, write_checkpoint

import distbelief
from distbelief.algorithms.downpour.messages import Fetch, FetchReply, Push, RestoreShard
from distbelief.algorithms.downpour.parameter_shard import ParameterShard
from distbelief.algorithms.downpour.recovery import SegmentSource, choose, split_checkpoint
from distbelief.core.flat import flatten
from distbelief.core.layout import Segment
from distbelief.storage.checkpoint import ShardState

# ------------------------------------------------------------------ choosing sources (pure)


def test_the_newest_copy_of_each_segment_wins_and_its_optimizer_state_only_from_a_checkpoint():
    lengths = {0: 2, 1: 3}
    copies = [
        (0, 0, torch.full((2,), 1.0), 7),
        (1, 0, torch.full((2,), 2.0), 9),  # newest of segment 0
        (0, 1, torch.full((3,), 3.0), 4),
        (1, 1, None, -1),  # no copy
    ]
    saved = {
        0: SegmentSource("checkpoint", torch.zeros(2), 5, {"state": "a"}),
        1: SegmentSource("checkpoint", torch.zeros(3), 6, {"state": "b"}),  # newest of 1
    }
    restore = choose(1, lengths, copies, saved, applied_known=20)
    torch.testing.assert_close(restore.values[0], torch.full((2,), 2.0))
    torch.testing.assert_close(restore.values[1], torch.zeros(3))
    assert restore.versions == {0: 9, 1: 6}
    assert restore.optimizer == {1: {"state": "b"}}
    assert restore.record == {
        "actor": "shard1",
        "restored_version": 15,
        "lost_updates": 5,
        "applied_last_reported": 20,
        "optimizer": "mixed",
        "source": "checkpoint+replica1",
        "sources": {0: "replica1", 1: "checkpoint"},
    }


def test_a_segment_without_any_source_keeps_its_initial_values_and_a_tie_goes_to_the_checkpoint():
    saved = {0: SegmentSource("checkpoint", torch.ones(2), 3, {"s": 1})}
    restore = choose(0, {0: 2, 1: 2}, [(0, 0, torch.zeros(2), 3)], saved, applied_known=1)
    assert restore.record["sources"] == {0: "checkpoint", 1: "initial"}
    assert 1 not in restore.values and restore.versions[1] == 0
    assert restore.record["lost_updates"] == 0  # never negative: the report was older
    only_copies = choose(0, {0: 2}, [(3, 0, torch.zeros(2), 3)])
    assert only_copies.record["optimizer"] == "fresh" and only_copies.record["source"] == "replica3"
    with pytest.raises(ValueError, match="holds 3 values of shard 0's segment of 2"):
        choose(0, {0: 2}, [(0, 0, torch.zeros(3), 1)])


def test_a_checkpointed_slice_is_cut_into_its_segments_in_stage_order():
    state = ShardState(0, torch.arange(5.0), {1: {"x": 1}}, {0: 4, 1: 8})
    parts = split_checkpoint(state, {1: 3, 0: 2})
    torch.testing.assert_close(parts[0].values, torch.arange(2.0))
    torch.testing.assert_close(parts[1].values, torch.arange(2.0, 5.0))
    assert (parts[0].version, parts[1].version) == (4, 8)
    assert (parts[0].optimizer, parts[1].optimizer) == (None, {"x": 1})
    with pytest.raises(ValueError, match="holds 5 values, its segments 4"):
        split_checkpoint(state, {0: 2, 1: 2})


# ------------------------------------------------------------------ a restarted shard


def _shard(restarted: bool) -> tuple[ParameterShard, dict, RecordingContext]:
    seg = Segment(stage=0, shard=0, start=0, stop=4, pieces=((0, 4),))
    shard = ParameterShard(0, torch.zeros(4), 0, (seg,), "adagrad", 0.1)
    shard.restarted = restarted  # as the runtime sets it, before asking for the handlers
    ctx = RecordingContext("shard0")
    shard.bind(ctx)
    return shard, shard.bound_handlers(), ctx


def test_a_restarted_shard_holds_every_message_back_until_it_is_restored():
    shard, handlers, ctx = _shard(restarted=True)
    handlers[Push](Push(1, 0, (torch.ones(4),), fetched_version=12), "stage")
    handlers[Fetch](Fetch(0, 0), "stage")
    assert ctx.sent == [] and shard.updates_applied == 0
    restore = RestoreShard({0: torch.full((4,), 5.0)}, {0: 10}, {}, {"rejected_pushes": 2})
    handlers[RestoreShard](restore, "master")
    # The push was applied to the restored values (staleness clamped at 0: it quoted a
    # version newer than the restore found), then the fetch answered with the result.
    ((_, reply),) = ctx.sent
    assert isinstance(reply, FetchReply) and reply.version == 11
    assert bool((reply.weights < 5.0).all())
    stats = shard.stats()
    assert (stats["updates_applied"], stats["rejected_pushes"], stats["staleness_max"]) == (
        11,
        2,
        0,
    )


def test_a_shard_that_never_died_handles_messages_at_once():
    _, handlers, ctx = _shard(restarted=False)
    handlers[Fetch](Fetch(0, 0), "stage")
    assert isinstance(ctx.sent[0][1], FetchReply)


# ------------------------------------------------------------------ whole runs, in one process


def toy(n: int = 256):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def run(faults, **kw):
    args = dict(loss="cross_entropy", lr=0.1, batch_size=16, epochs=3, seed=0)
    args.update(replicas=2, stages=2, shards=2, optimizer="adagrad")
    args.update(kw)
    if "checkpoint_dir" in args:  # the planted checkpoint only, not the run's own every epoch
        args.setdefault("checkpoint_every", 0)
    model = args.pop("model", None) or mlp([10, 16, 16, 3])
    opts = {"faults": faults, **args.pop("runtime_options", {})}
    return distbelief.train(model, args.pop("data", None) or toy(), runtime_options=opts, **args)


@pytest.mark.slow
def test_main_job_with_a_shard_killed_mid_run_recovers_from_the_replicas_copies(mnist1d_data):
    """The main job's settings for 5 epochs (MNIST-1D, 4 replicas x 2 stages, 2 shards,
    Adagrad 0.05, batch 32; the engine test's run): shard1 dies after 1,000 of its ~1,260
    updates, is restored from the newest replica's copy (no checkpoint), and the run keeps the
    engine test's accuracy band (0.62 here; with shuffled labels 0.09). The in-process runtime
    is seeded: this run is the same every time."""
    train, test = mnist1d_data
    killed_at = 1000
    result = distbelief.train(
        mlp([40, 256, 256, 10]), train, loss="cross_entropy", lr=0.05, batch_size=32,
        epochs=5, replicas=4, stages=2, shards=2, optimizer="adagrad", eval_data=test,
        seed=0, runtime_options={"faults": [f"kill:shard1@update={killed_at}"]},
    )  # fmt: skip
    assert result.history.accuracy >= 0.60
    assert result.stats["restarts_by_actor"] == {"shard1": 1}
    assert result.stats["examples"] == 5 * len(train[0])
    (rec,) = result.stats["recoveries"]
    assert rec["actor"] == "shard1" and rec["source"].startswith("replica")
    assert rec["optimizer"] == "fresh" and rec["checkpoint"] is None
    # It had applied exactly killed_at updates; replicas fetch every step, so the newest copy
    # is a few updates behind at most (997 in this run), and newer than the shard's last
    # report to the master: nothing is counted lost.
    assert killed_at - 8 <= rec["restored_version"] <= killed_at
    assert 0 < rec["applied_last_reported"] <= rec["restored_version"]
    assert rec["lost_updates"] == 0
    # Versions kept increasing across the restore: the shard counts on from there.
    assert result.stats["updates_applied"][1] > rec["restored_version"]


def test_a_checkpoint_older_than_the_copies_is_passed_over(tmp_path):
    model = mlp([10, 16, 16, 3])
    write_checkpoint(tmp_path, model, version=0)
    result = run(["kill:shard1@update=30"], model=model, checkpoint_dir=tmp_path)
    (rec,) = result.stats["recoveries"]
    assert rec["source"].startswith("replica") and rec["optimizer"] == "fresh"
    assert rec["checkpoint"].endswith("ckpt-000000000000")
    assert result.stats["examples"] == 3 * 256


def test_a_checkpoint_newer_than_the_copies_restores_values_versions_and_optimizer(tmp_path):
    model = mlp([10, 16, 16, 3])
    write_checkpoint(tmp_path, model, version=10_000)
    result = run(["kill:shard1@update=30"], model=model, checkpoint_dir=tmp_path)
    (rec,) = result.stats["recoveries"]
    assert rec["source"] == "checkpoint" and rec["optimizer"] == "checkpoint"
    segments = len(rec["sources"])
    assert rec["restored_version"] == 10_000 * segments
    assert result.stats["updates_applied"][1] > rec["restored_version"]  # counts on from it
    assert torch.isfinite(flatten(result.model.children())).all()


def test_a_broken_checkpoint_is_noted_and_the_copies_serve(tmp_path):
    model = mlp([10, 16, 16, 3])
    path = write_checkpoint(tmp_path, model, version=10_000)
    (path / "shard1.safetensors").write_bytes(b"garbage")
    result = run(["kill:shard1@update=30"], model=model, checkpoint_dir=tmp_path)
    (rec,) = result.stats["recoveries"]
    assert rec["source"].startswith("replica") and "shard1.safetensors" in rec["note"]


ON_PROCESSES = [pytest.mark.processes, pytest.mark.slow]


@pytest.mark.parametrize(
    "fault, source, version, runtime",
    [
        # Before most stages fetched: the newest copy is the one of version 0 (the first
        # update is lost), still a replica's and not the shard's initial values.
        ("kill:shard0@update=1", "replica1", 0, "local"),
        ("exit:shard1@update=40", "replica0", 38, "local"),  # replicas fetched 2 updates ago
        ("kill:shard0@message=30", "replica1", 10, "local"),
        # On processes the shard is hosted in every process: its kill is its state treated
        # as lost; an exit crashes the worker that handles the push inside the shard's locked
        # section (the lock is broken, the shard restored, the worker and its replica
        # restarted). Not seeded there: any replica's copy may be the newest.
        pytest.param("kill:shard0@update=30", None, None, "processes", marks=ON_PROCESSES),
        pytest.param("exit:shard1@update=40", None, None, "processes", marks=ON_PROCESSES),
    ],
)
def test_a_shard_dying_at_any_point_is_recovered_and_the_run_completes(
    fault, source, version, runtime
):
    result = run([fault], runtime=runtime)
    k = int(fault.split(":")[1].split("@")[0].removeprefix("shard"))
    assert result.stats["examples"] == 3 * 256
    recs = [r for r in result.stats["recoveries"] if r["actor"].startswith("shard")]
    (rec,) = recs
    assert rec["actor"] == f"shard{k}"
    if runtime == "local":
        assert result.stats["restarts"] == 1
        # The seeded in-process run is the same every time: the same copy wins each time.
        assert set(rec["sources"].values()) == {source} and rec["restored_version"] == version
        assert result.stats["updates_applied"][k] > version  # it counted on from the restore
    else:
        # The worker that crashed hosted replica 0 or 1 whole: its actors were restarted too.
        restarted = set(result.stats["restarts_by_actor"])
        assert f"shard{k}" in restarted and len(restarted) == (1 if "kill" in fault else 4)
        assert rec["source"].startswith("replica") and rec["restored_version"] > 0
        # Not seeded: the newest copy may be older than the shard's last report (an exit
        # loses the crashed replica's copies; after a kill the other worker applies pushes to
        # the shared state and reports them until its mail is rerouted to the driver), and
        # the difference is counted lost.
        lost = rec["applied_last_reported"] - rec["restored_version"]
        assert rec["lost_updates"] == max(0, lost)
        # It counts on from the restore, but the run may end before another push reaches it
        # (the other worker pushed on while the crashed one was replaced: CI saw 47 and 47).
        assert result.stats["updates_applied"][k] >= rec["restored_version"]
    assert torch.isfinite(flatten(result.model.children())).all()


def test_updates_past_the_restored_copies_that_the_master_saw_are_counted_lost():
    # With n_fetch = 8 the replicas fetch once an epoch, so their copies of shard1 are of the
    # epoch's start (version 32: 2 replicas x 2 epochs x 8 pushes), while the shard reported
    # 38 updates applied before it died at its 40th: the 6 in between are counted lost.
    result = run(["kill:shard1@update=40"], n_fetch=8)
    (rec,) = result.stats["recoveries"]
    assert (rec["restored_version"], rec["applied_last_reported"]) == (32, 38)
    assert rec["lost_updates"] == 6


def test_a_shard_killed_while_the_replicas_drain_at_the_end_is_recovered():
    # 2 replicas x 3 epochs of 8 steps push 48 times to each of shard0's 2 segments: killed at
    # its last update the shard dies while the stages wait for Drained (or the final
    # snapshot): both are asked of the new shard.
    result = run(["kill:shard0@update=96"])
    assert result.stats["restarts_by_actor"] == {"shard0": 1}
    assert result.stats["examples"] == 3 * 256


@pytest.mark.parametrize(
    "fault, reported, runtime",
    [
        # (a data shard reports every step here; the seeded in-process run is the same
        # every time)
        ("kill:data0@message=20", 17, "local"),
        ("exit:data1@step=3", 3, "local"),  # dies at step 3: steps 0..2 were reported
        ("kill:data1@message=3", 0, "local"),  # dies before its first step was reported
        # On processes a kill rebuilds the data shard in its worker; an exit replaces the
        # worker, which hosted the replica whole: its stages are restarted too. The steps
        # reported by then depend on the interleaving there.
        pytest.param("kill:data0@step=5", None, "processes", marks=ON_PROCESSES),
        pytest.param("exit:data1@step=3", None, "processes", marks=ON_PROCESSES),
    ],
)
def test_a_data_shard_killed_resumes_at_its_reported_step_and_the_run_completes(
    fault, reported, runtime
):
    result = run([fault], runtime=runtime)
    name = fault.split(":")[1].split("@")[0]
    r = name.removeprefix("data")
    expected = {name: 1}
    if runtime == "processes" and fault.startswith("exit"):
        expected.update({f"replica{r}.stage0": 1, f"replica{r}.stage1": 1})
    assert result.stats["restarts_by_actor"] == expected
    assert result.stats["examples"] == 3 * 256  # steps redone after the report count once
    assert result.stats["steps"] == 2 * 3 * 8
    (rec,) = result.stats["recoveries"]
    # Resumed by the master at the steps last reported before the kill (not started over).
    if reported is None:
        step = int(fault.rpartition("=")[2])
        reported = rec["resumed_at_step"]
        assert 0 <= reported <= step  # (as last reported: at most the step it died at)
    assert rec == {"actor": name, "resumed_at_step": reported, "source": "master"}


@pytest.mark.parametrize(
    "fault, runtime",
    [
        ("kill:master@message=2", "local"),
        ("kill:master@message=40", "local"),
        ("exit:master@message=95", "local"),
        # On processes the master lives in the driver's process: rebuilt there (an exit of
        # the driver's process is a kill, as in one process).
        pytest.param("exit:master@message=40", "processes", marks=ON_PROCESSES),
    ],
)
def test_the_master_killed_is_rebuilt_from_the_data_shards_and_the_run_completes(fault, runtime):
    wiring = []  # what the driver tells the master (its wiring, again to a new master)

    def tap(sender, receiver, message):
        if sender == "driver" and receiver == "master":
            wiring.append(type(message).__name__)

    result = run([fault], warmstart_steps=4, runtime=runtime, runtime_options={"tap": tap})
    assert wiring.count("ConnectMaster") == 2  # a new master, wired as the first was
    assert result.stats["restarts_by_actor"] == {"master": 1}
    assert result.stats["examples"] == 3 * 256
    assert result.stats["steps"] == 2 * 3 * 8
    assert [r["actor"] for r in result.stats["recoveries"]] == ["master"]


# ------------------------------------------------------------------ the master, stepped


def test_a_restarted_master_recovers_a_shard_whose_restore_was_lost_with_its_earlier_life():
    from distbelief.algorithms.downpour.master import DownpourMaster
    from distbelief.algorithms.downpour.messages import (
        ConnectMaster,
        CopyRequest,
        SegmentCopy,
        ShardStats,
        StatsRequest,
        StatusRequest,
    )
    from distbelief.runtime.base import ActorRestarted

    master = DownpourMaster(1, 0, 64, None, 0, 16)
    master.restarted = True
    ctx = RecordingContext("master")
    master.bind(ctx)
    stages = (("r0s0", "r0s1"),)
    master.receive(ConnectMaster(("data0",), ("shard0",), (), stages), "driver")
    master.receive(ActorRestarted("master", "master"), "driver")
    assert [(to, type(m)) for to, m in ctx.sent] == [
        ("data0", StatusRequest),
        ("shard0", StatsRequest),
    ]
    ctx.sent.clear()
    master.receive(ShardStats(0, {"awaiting_restore": True}), "shard0")
    assert sorted(to for to, m in ctx.sent if isinstance(m, CopyRequest)) == ["r0s0", "r0s1"]
    ctx.sent.clear()
    master.receive(SegmentCopy(0, 0, 0, 2, torch.ones(2), 5), "r0s0")
    master.receive(ShardStats(0, {"awaiting_restore": True}), "shard0")  # asked before: no
    assert ctx.sent == []
    master.receive(SegmentCopy(0, 0, 1, 0, None, -1), "r0s1")
    ((to, restore),) = ctx.sent
    assert to == "shard0" and isinstance(restore, RestoreShard) and restore.versions == {0: 5}
    assert master.recoveries[-1]["source"] == "replica0"


@pytest.mark.parametrize(
    "faults, runtime",
    [
        (["kill:data0@message=2", "exit:master@message=1"], "local"),  # data0 answers status
        (["kill:shard1@update=20", "kill:master@message=50"], "local"),
        (["kill:data1@message=9", "kill:master@message=21"], "local"),
        pytest.param(
            ["kill:shard1@update=20", "kill:master@message=50"], "processes", marks=ON_PROCESSES
        ),
    ],
)
def test_two_actors_killed_are_both_recovered_and_the_run_completes(faults, runtime):
    result = run(faults, warmstart_steps=6, runtime=runtime)
    assert result.stats["restarts_by_actor"] == {f.split(":")[1].split("@")[0]: 1 for f in faults}
    assert result.stats["examples"] == 3 * 256
    assert torch.isfinite(flatten(result.model.children())).all()


@pytest.mark.slow
@pytest.mark.processes
def test_main_job_on_processes_survives_a_death_of_every_kind_and_keeps_its_accuracy(
    mnist1d_data,
):
    """The main job (as the test above) on processes, two workers of two replicas each, with
    a stage, a data shard, the master and a shard killed, and a worker crashing (its two
    replicas restarted whole): every death survived, each example trained once, and the
    accuracy within the band of the run without faults (0.62 in one process)."""
    train, test = mnist1d_data
    steps = 5 * len(train[0]) // 4 // 32  # of each replica
    faults = [
        f"kill:replica1.stage0@step={steps // 5}",
        f"kill:data3@step={steps // 4}",
        f"exit:replica2.stage1@step={steps // 3}",  # worker 1 (replicas 0 and 2) crashes
        "kill:master@message=60",
        "kill:shard1@update=400",
    ]
    result = distbelief.train(
        mlp([40, 256, 256, 10]), train, loss="cross_entropy", lr=0.05, batch_size=32,
        epochs=5, replicas=4, stages=2, shards=2, optimizer="adagrad", eval_data=test,
        seed=0, runtime="processes", runtime_options={"faults": faults},
    )  # fmt: skip
    assert result.history.accuracy >= 0.60
    assert result.stats["examples"] == 5 * len(train[0])
    by_actor = result.stats["restarts_by_actor"]
    for name in ("replica1.stage0", "data3", "master", "shard1"):
        assert by_actor.pop(name) == 1
    where = result.stats["processes"]
    crashed = {n for n, w in where.items() if w == where["replica2.stage1"]}
    assert crashed == {"data0", "data2", *(f"replica{r}.stage{s}" for r in (0, 2) for s in (0, 1))}
    assert by_actor == dict.fromkeys(crashed, 1)
    shards = [r for r in result.stats["recoveries"] if r["actor"] == "shard1"]
    assert len(shards) == 1 and shards[0]["source"].startswith("replica")
