"""The processes runtime: actors in forked workers, shared actors over shared memory, failures
named, nothing left behind."""

from __future__ import annotations

import gc
import os
import re

import pytest
import torch
from support import mlp
from torch import nn

import distbelief
from distbelief.algorithms.downpour.parameter_shard import ParameterShard
from distbelief.core.flat import flatten
from distbelief.core.layout import Layout
from distbelief.core.optim import UPDATE_RULES, make_update_rule, materialize_state
from distbelief.errors import ActorFailed, ConfigError, Deadlock, RunTimeout
from distbelief.runtime import Actor, make_runtime, receives
from distbelief.runtime import processes as procs
from distbelief.runtime.processes import ProcessesRuntime

pytestmark = pytest.mark.processes  # the whole module runs the processes runtime


class Go:
    pass


class Count(Actor):
    """Sends ``n`` numbered messages to ``to``."""

    def __init__(self, to: object, n: int) -> None:
        self.to, self.n = to, n

    @receives(Go)
    def on_go(self, msg: Go, sender: object) -> None:
        for i in range(self.n):
            self.ctx.tell(self.to, i)


class Check(Actor):
    """Replies ``(pid, numbers seen)`` to the driver once ``n`` numbers came, if they came in
    order (per-sender FIFO)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    @receives(Go)
    def on_go(self, msg: Go, sender: object) -> None:
        self.driver = sender

    @receives(int)
    def on_number(self, msg: int, sender: object) -> None:
        assert msg == len(self.seen), f"got {msg} after {len(self.seen)}"
        self.seen.append(msg)
        if len(self.seen) == self.n:
            self.ctx.tell(self.driver, (os.getpid(), len(self.seen)))


def test_messages_between_workers_keep_per_sender_order():
    rt = ProcessesRuntime(seed=0, processes=2)  # two workers, however many CPUs
    try:
        check = rt.spawn("check1", Check, 2000)
        count = rt.spawn("count0", Count, check, 2000)
        rt.tell(check, Go())
        rt.tell(count, Go())
        pid, seen = next(iter(rt.converse(check, Go(), timeout=60)))
        assert seen == 2000
        assert pid != os.getpid() and pid in rt.describe()["worker_pids"]
        # Groups take workers in the order they first appear: check1's group 1 first.
        assert rt.describe()["processes"] == {"check1": 1, "count0": 2}
    finally:
        rt.shutdown()


class Boom(Actor):
    @receives(Go)
    def on_go(self, msg: Go, sender: object) -> None:
        raise ValueError("kaboom")


class Die(Actor):
    @receives(Go)
    def on_go(self, msg: Go, sender: object) -> None:
        os._exit(3)  # a crash: no exception, no report


class Silent(Actor):
    @receives(Go)
    def on_go(self, msg: Go, sender: object) -> None:
        pass


def test_an_actor_raising_in_a_worker_ends_the_run_naming_it():
    rt = ProcessesRuntime(seed=0)
    try:
        ref = rt.spawn("replica1.stage0", Boom)
        with pytest.raises(ActorFailed, match=r"replica1\.stage0.*Go.*kaboom") as info:
            next(iter(rt.converse(ref, Go(), timeout=60)))
        assert isinstance(info.value.cause, ValueError)
    finally:
        rt.shutdown()


def test_a_worker_that_dies_is_an_error_naming_the_actor_not_a_hang():
    rt = ProcessesRuntime(seed=0)
    try:
        rt.spawn("replica0.stage0", Silent)
        ref = rt.spawn("replica1.stage0", Die)
        with pytest.raises(ActorFailed, match=r"replica1\.stage0.*exit code 3"):
            next(iter(rt.converse(ref, Go(), timeout=60)))
    finally:
        rt.shutdown()


class Busy(Actor):
    """Keeps itself busy forever and never replies."""

    @receives(Go)
    def on_go(self, msg: Go, sender: object) -> None:
        self.ctx.tell(self.ctx.self_ref, Go())


def test_a_reply_that_never_comes_is_a_deadlock_error_not_a_hang():
    rt = ProcessesRuntime(seed=0)
    try:
        rt.spawn("replica0.stage0", Busy)  # a worker busy elsewhere does not hide the deadlock
        ref = rt.spawn("replica1.stage0", Silent)
        with pytest.raises(Deadlock, match="no actor in any process"):
            next(iter(rt.converse(ref, Go(), timeout=60)))
    finally:
        rt.shutdown()


@pytest.mark.slow  # (the fast tier stays under a minute)
def test_a_run_that_never_ends_is_a_timeout():
    rt = ProcessesRuntime(seed=0)
    try:
        ref = rt.spawn("replica1.stage0", Busy)
        with pytest.raises(RunTimeout, match="timeout"):
            next(iter(rt.converse(ref, Go(), timeout=1.0)))
    finally:
        rt.shutdown()


def _fds() -> set[tuple[str, str]]:
    """This process's open files but its sockets and anonymous inodes: a Ray session another
    test left running opens and closes those in its own threads at any time, while what this
    runtime could leak is a pipe or shared memory."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (listdir's own descriptor, or a Ray thread's)
            continue
        if not target.startswith(("socket:", "anon_inode:")):
            out.add((fd, target))
    return out


def _shm(pids: list[int]) -> set[str]:
    """The entries of /dev/shm that processes ``pids`` made. Other programs on this machine
    come and go there; what torch (``torch_<pid>_...``) and multiprocessing (``pym-<pid>-...``)
    name a segment carries the pid of the process that made it."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {e for e in os.listdir("/dev/shm") if set(re.findall(r"\d+", e)) & set(map(str, pids))}


def _one_run() -> list[int]:
    """A run with a shared shard, two workers and a ring of slots each way between them (two
    neighbouring stages: tensors through slots), shut down; the workers' pids."""
    rt = make_runtime("processes", seed=0, processes=2)
    layout = Layout.build([100], 1, [100])
    segments = layout.segments_of_shard(0)
    shard = rt.spawn("shard0", ParameterShard, 0, torch.zeros(100), 0, segments, "adagrad", 0.1)
    # One group (fewer than the workers): its members are spread, so count (member 0, with
    # the first stage) and check (member 1) are in different workers too.
    check = rt.spawn("pair3.check1", Check, 3)
    count = rt.spawn("count3", Count, check, 3)
    last = rt.spawn("pair3.stage1", Echo)
    first = rt.spawn("pair3.stage0", Echo)
    rt.tell(check, Go())
    assert next(iter(rt.converse(count, Go(), timeout=60)))[1] == 3
    assert next(iter(rt.converse(first, (last, [torch.ones(4096)]), timeout=60)))[0] == 1
    workers = rt.describe()["worker_pids"]
    assert len(workers) == 2 and rt.actor(shard).held[0].values.is_shared()
    assert rt.describe()["wire"]["tensors_in_slots"] == 2  # there and back
    rt.shutdown()
    del rt, shard, count, check, first, last
    gc.collect()
    return workers


def test_shutdown_leaves_no_worker_and_no_shared_memory():
    # The first run in a process makes multiprocessing's shared heap, which it keeps open for
    # reuse: what a run leaves behind is what a run after it adds.
    _one_run()
    fds, shm = _fds(), _shm([os.getpid()])
    workers = _one_run()
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert _shm([os.getpid(), *workers]) == shm
    assert _fds() == fds


@pytest.mark.parametrize("shard_updates", ["locked", "hogwild"])
def test_replicas_in_two_workers_update_one_shared_shard(mnist1d_data, shard_updates):
    (x, y), _ = mnist1d_data
    x, y = x[:512], y[:512]
    result = distbelief.train(
        mlp([40, 32, 10]), (x, y), loss="cross_entropy", lr=0.05, batch_size=16, epochs=2,
        replicas=2, shards=2, optimizer="adagrad", seed=0, runtime="processes",
        runtime_options={"shard_updates": shard_updates, "processes": 2},
    )  # fmt: skip
    # Every push of both workers counted by each shard (the counters are shared), and staleness
    # measured from versions both workers advance: with hogwild updates too, whose bookkeeping
    # stays under the lock.
    assert result.stats["updates_applied"] == [result.stats["steps"]] * 2
    assert result.stats["steps"] == 2 * 2 * (256 // 16)
    assert sum(result.stats["staleness_histogram"]) == 2 * result.stats["steps"]
    assert torch.isfinite(flatten(result.model.children())).all()
    assert result.stats["processes"] == {
        "shard0": "shared", "shard1": "shared", "master": 0,
        "data0": 1, "replica0.stage0": 1, "data1": 2, "replica1.stage0": 2,
    }  # fmt: skip


@pytest.mark.parametrize("rule", list(UPDATE_RULES))
def test_materialized_state_changes_no_step(rule):
    torch.manual_seed(0)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    fresh = nn.Parameter(torch.randn(5, dtype=torch.float64))
    early = nn.Parameter(fresh.detach().clone())
    a, b = make_update_rule(rule, [fresh], 0.1), make_update_rule(rule, [early], 0.1)
    materialize_state(b)
    assert b.state[early] or rule == "sgd"
    for g in grads:
        for p, opt in ((fresh, a), (early, b)):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(fresh, early)


def test_hogwild_updates_of_one_replica_are_the_locked_updates_exactly(mnist1d_data):
    # One replica: nothing races, so leaving the lock out of the update must change no number.
    (x, y), _ = mnist1d_data
    runs = [
        distbelief.train(
            mlp([40, 32, 10]),
            (x[:256], y[:256]),
            loss="cross_entropy",
            lr=0.05,
            batch_size=16,
            epochs=2,
            shards=2,
            optimizer="adagrad",
            seed=0,
            runtime="processes",
            runtime_options={"shard_updates": mode},
        )  # fmt: skip
        for mode in ("locked", "hogwild")
    ]
    locked, hogwild = (flatten(r.model.children()) for r in runs)
    assert torch.equal(locked, hogwild)
    assert runs[0].stats["staleness_histogram"] == runs[1].stats["staleness_histogram"]


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="^runtime_options: shard_updates must be one of"):
        make_runtime("processes", shard_updates="racy")
    with pytest.raises(ConfigError, match="^runtime_options: unknown option"):
        make_runtime("processes", address="x")
    with pytest.raises(ConfigError, match="^runtime_options: processes must be"):
        make_runtime("processes", processes=0)


def test_a_planned_crash_in_a_worker_without_restarts_left_ends_the_run_naming_the_actor():
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    match = r"^actor 'replica1\.stage0' failed.*exit code 70.*no restarts left"
    with pytest.raises(ActorFailed, match=match):
        distbelief.train(
            mlp([10, 8, 3]), (x, y), loss="cross_entropy", lr=0.1, batch_size=8, epochs=1,
            replicas=2, seed=0, runtime="processes",
            runtime_options={"faults": ["exit:replica1.stage0@step=2"], "max_restarts": 0},
        )  # fmt: skip


# ---------------------------------------------------------------------- placement and the wire


def test_placement_spreads_stages_only_where_workers_would_idle():
    two_stages = ["data0", "replica0.stage0", "replica0.stage1"]
    assert procs.place(two_stages, 2) == {"data0": 1, "replica0.stage0": 1, "replica0.stage1": 2}
    assert procs.place(two_stages, 1) == dict.fromkeys(two_stages, 1)
    # 2 replicas x 3 stages on 4 workers (fewer replicas than workers): neighbouring stages
    # apart, 6 stages as 2 + 2 + 1 + 1, every data shard with its replica's first stage.
    names = [n for r in range(2) for n in (f"data{r}", f"replica{r}.stage0")]
    names += [f"replica{r}.stage{s}" for s in (1, 2) for r in range(2)]  # after the first
    homes = procs.place(names, 4)
    for r in range(2):
        assert homes[f"replica{r}.stage0"] != homes[f"replica{r}.stage1"]
        assert homes[f"replica{r}.stage1"] != homes[f"replica{r}.stage2"]
        assert homes[f"data{r}"] == homes[f"replica{r}.stage0"]
    stages = [homes[f"replica{r}.stage{s}"] for r in range(2) for s in range(3)]
    assert sorted(stages.count(w) for w in (1, 2, 3, 4)) == [1, 1, 2, 2]
    # As many replicas as workers or more (the main job: 4 x 2 on 2): each replica whole in
    # one worker, round-robin in order of first appearance.
    main = [n for r in range(4) for n in (f"data{r}", f"replica{r}.stage0", f"replica{r}.stage1")]
    homes = procs.place(main, 2)
    assert homes == {n: int(n.split(".")[0].removeprefix("data").removeprefix("replica")) % 2 + 1
                     for n in main}  # fmt: skip
    # One stage per replica: one replica per worker, in order of first appearance (as ever).
    one = ["data1", "replica1.stage0", "data0", "replica0.stage0", "data2", "replica2.stage0"]
    assert procs.place(one, 2) == {
        "data1": 1, "replica1.stage0": 1, "data0": 2, "replica0.stage0": 2,
        "data2": 1, "replica2.stage0": 1,
    }  # fmt: skip
    assert procs.place(["master"], 4) == {}  # (a shared actor is not placed: it is everywhere)


def test_a_two_stage_replica_runs_on_two_cores_and_equals_the_local_run(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # the default: one worker per core
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)
    kw = dict(loss="cross_entropy", lr=0.1, batch_size=64, epochs=2, stages=2, seed=7)
    model = mlp([10, 64, 16, 3])  # 64 x 64 activations: 16 KiB, through the slots
    runs = {
        rt: distbelief.train(model, (x, y), optimizer="adagrad", runtime=rt, **kw)
        for rt in ("local", "processes")
    }
    assert torch.equal(*(flatten(r.model.children()) for r in runs.values()))
    stats = runs["processes"].stats
    assert stats["processes"] == {
        "shard0": "shared", "master": 0, "data0": 1, "replica0.stage0": 1, "replica0.stage1": 2,
    }  # fmt: skip
    steps = stats["steps"]
    # Each step's activations forward and their gradient back crossed in a slot; the targets
    # (512 bytes) were pickled.
    assert stats["wire"]["tensors_in_slots"] == 2 * steps
    assert stats["wire"]["slot_bytes"] == 2 * steps * 64 * 64 * 4
    assert stats["wire"]["tensors_pickled"] >= steps


class Echo(Actor):
    """Given ``(peer, tensors)`` by the driver, sends the tensors to ``peer``; given tensors by
    a peer, checks them against what was sent and replies to the driver how many came."""

    @receives(tuple)
    def on_start(self, msg: tuple, sender: object) -> None:
        peer, tensors = msg
        self.driver = sender
        self.ctx.tell(peer, ["there", *tensors])

    @receives(list)
    def on_tensors(self, msg: list, sender: object) -> None:
        if msg[0] == "back":
            self.ctx.tell(self.driver, (len(msg) - 1, msg[1:]))
        else:
            self.ctx.tell(sender, ["back", *msg[1:]])


def test_tensors_cross_between_stages_unchanged_by_slot_or_pickle():
    torch.manual_seed(0)
    big = torch.randn(300, 1000)  # 1.2 MB: larger than a slot, pickled
    tensors = [
        torch.randn(64, 32),  # 8 KiB: a slot
        torch.randn(64, 32, dtype=torch.float64).t(),  # not contiguous
        torch.arange(6).reshape(2, 3)[:, 1],  # a view into a bigger storage
        torch.tensor(3.5),  # 0-d
        torch.zeros(0, 5),  # empty
        torch.rand(5000) > 0.5,  # bool
        torch.randn(70, 70).to(torch.bfloat16),
        torch.randn(3, dtype=torch.complex64),  # not plain: torch's own pickling
        big,
        *[torch.full((2048,), float(i)) for i in range(2 * procs.SLOTS)],  # more than the ring
    ]
    rt = ProcessesRuntime(seed=0, processes=2)
    try:
        second = rt.spawn("pair1.stage1", Echo)
        first = rt.spawn("pair1.stage0", Echo)
        n, back = next(iter(rt.converse(first, (second, tensors), timeout=60)))
        assert n == len(tensors)
        for sent, got in zip(tensors, back, strict=True):
            assert got.dtype == sent.dtype and torch.equal(got, sent)
        wire = rt.describe()["wire"]
        assert rt.describe()["processes"] == {"pair1.stage1": 2, "pair1.stage0": 1}
        # The ring filled within the message (a slot is freed when its message is read),
        # so the rest was pickled: no send waited for a slot.
        assert wire["tensors_in_slots"] == 2 * procs.SLOTS
        assert wire["tensors_pickled"] > 0
    finally:
        rt.shutdown()


# ---------------------------------------------------------------------- restarts


def _hold_and_die(lock) -> None:
    lock.__enter__()
    os._exit(0)


def test_a_lock_whose_holder_died_is_broken_by_the_driver_and_a_worker_waits_bounded(
    monkeypatch,
):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    lock = procs._TimedLock(ctx, "shard1")
    segment = lock.sibling("segment 0")  # a shard's segment: its own lock, broken with it
    holder = ctx.Process(target=_hold_and_die, args=(lock,))
    holder.start()
    holder.join(10)
    assert lock.holder == holder.pid  # it died holding the lock
    # A worker has no breaker: its wait is bounded, then the run ends (not a hang).
    monkeypatch.setattr(procs, "LOCK_TIMEOUT_S", 0.3)
    with pytest.raises(RunTimeout, match="lock of shared actor 'shard1'"):
        lock.__enter__()
    # The driver's process breaks the lock of a dead holder while it waits, once.
    broken = []
    monkeypatch.setattr(procs, "_BREAKER", lambda held: broken.append(held.break_if_dead()))
    with lock:
        assert lock.holder == os.getpid()
    assert broken.count(True) == 1 and lock.holder == 0
    assert not lock.break_if_dead()  # free now: nothing to break
    # A dead holder of a segment's lock is found through the shard's lock (the driver looks
    # at each shared actor's lock when a worker dies).
    holder = ctx.Process(target=_hold_and_die, args=(segment,))
    holder.start()
    holder.join(10)
    assert segment.holder == holder.pid and segment.name == "shard1"
    assert lock.break_if_dead() and segment.holder == 0
    with segment:  # free again
        pass


@pytest.mark.slow
def test_a_worker_crashing_inside_a_hogwild_shards_locked_section_is_survived():
    # Hogwild: the crash is in the bookkeeping under the lock (see the README): the lock is
    # broken, the shard restored from the other replica's copy, the crashed replica restarted.
    x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
    result = distbelief.train(
        mlp([10, 16, 3]), (x, y), loss="cross_entropy", lr=0.1, batch_size=16, epochs=2,
        replicas=2, shards=2, optimizer="adagrad", seed=0, runtime="processes",
        runtime_options={"faults": ["exit:shard0@update=20"], "shard_updates": "hogwild"},
    )  # fmt: skip
    assert result.stats["examples"] == 2 * 256
    assert result.stats["restarts_by_actor"]["shard0"] == 1
    (rec,) = [r for r in result.stats["recoveries"] if r["actor"] == "shard0"]
    assert rec["source"].startswith("replica")
    assert len(result.stats["worker_pids"]) == 3  # two workers and the crashed one's successor
    assert torch.isfinite(flatten(result.model.children())).all()


_LONG_RUN_WITH_A_CRASH = """
import torch, distbelief
from support import mlp
x, y = torch.randn(4096, 10), torch.randint(0, 3, (4096,))
distbelief.train(mlp([10, 16, 3]), (x, y), loss="cross_entropy", lr=0.1, batch_size=16,
                 epochs=1000, replicas=2, seed=0, runtime="processes",
                 runtime_options={"faults": ["exit:replica1.stage0@step=3"]})
"""


@pytest.mark.slow
def test_a_replacement_worker_does_not_outlive_a_driver_killed_with_sigkill():
    # The replacement is the fork server's child, not the driver's: it dies with the fork
    # server, which dies with the driver (parent-death signals, both).
    import signal
    import subprocess
    import sys

    from test_stop_signals import _children, _running, _wait_for

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-c", _LONG_RUN_WITH_A_CRASH], env=env)
    try:

        def replaced() -> set[int] | None:
            grandchildren = {g for c in _children(driver.pid) for g in _children(c)}
            return grandchildren or None  # (only the fork server has children)

        replacement = _wait_for(replaced, 120, "a replacement worker")
        run = {*_children(driver.pid), *replacement}
        assert len(run) == 3  # the worker that lives, the fork server, the new worker
        driver.send_signal(signal.SIGKILL)
        driver.wait(60)
        _wait_for(lambda: not any(_running(p) for p in run), 5, "the run's processes")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def _page_faults_of_fresh_tensors(keep: bool, conn) -> None:
    """(In a forked child.) Minor page faults of 10 tensors of 40 MiB made, written and freed
    one after the other, after ``_keep_freed_memory`` or not."""
    import resource

    if keep:
        procs._keep_freed_memory()
    torch.ones(10 << 20).sum()  # the first one's pages fault in either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(10 << 20).sum()  # 40 MiB, written, freed
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)


def test_a_worker_keeps_the_memory_it_frees_so_fresh_tensors_do_not_fault_in_again() -> None:
    """Without ``_keep_freed_memory`` each tensor above glibc's largest mapping threshold (32
    MiB) is a fresh mapping whose pages (10,240 of 40 MiB) fault in on first write; with it
    (every worker calls it) the freed memory is reused."""
    import multiprocessing

    if not hasattr(os, "fork"):  # pragma: no cover
        pytest.skip("fork only")
    ctx = multiprocessing.get_context("fork")
    faults = {}
    for keep in (False, True):
        mine, theirs = ctx.Pipe()
        child = ctx.Process(target=_page_faults_of_fresh_tensors, args=(keep, theirs))
        child.start()
        assert mine.poll(60), "the child did not answer"
        faults[keep] = mine.recv()
        child.join(10)
    pages = (40 << 20) // 4096
    assert faults[False] >= 9 * pages  # the default: each handed back and faulted in again
    assert faults[True] < 2 * pages  # kept: about one tensor's pages, not ten (seen: 10,300)
