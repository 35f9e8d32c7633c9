"""SIGTERM stops a run as Ctrl-C does, and no worker outlives its driver.

A run stopped by SIGTERM keeps what it trained (``TrainingInterrupted`` with ``signum``), the CLI
exits 143, and every worker process of the run is gone within 5 s of its driver's death, whether
the driver stopped cleanly (SIGTERM) or was killed (SIGKILL, where only the kernel's parent-death
signal can end the workers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from support import logistic, mlp

import distbelief
from distbelief import cli
from distbelief.algorithms.downpour.checkpoints import StopCheckpoint, StopCheckpointTaken
from distbelief.algorithms.downpour.master import DownpourMaster
from distbelief.algorithms.downpour.messages import (
    CheckpointMarked,
    CheckpointRequest,
    ConnectMaster,
    DataPosition,
    ShardStateReply,
    StartReplica,
)
from distbelief.cli import main
from distbelief.core.flat import flatten
from distbelief.storage import checkpoint

GONE_WITHIN_S = 5.0


def _toy_data(n: int = 256):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_sigterm_stops_training_and_keeps_what_was_trained(runtime, tmp_path):
    model = mlp([10, 16, 8, 3])
    reports, seen = [], []

    def progress(report) -> None:  # the driver's thread, as a service manager's kill would be
        reports.append(report)
        if len(reports) == 3:
            signal.raise_signal(signal.SIGTERM)

    # If the run did not take SIGTERM, this handler would see it (and the test fail), rather
    # than the default action ending the test process.
    previous = signal.signal(signal.SIGTERM, lambda n, f: seen.append(n))
    try:
        with pytest.raises(distbelief.TrainingInterrupted) as info:
            distbelief.train(model, _toy_data(), loss="cross_entropy", lr=0.1, batch_size=16,
                             epochs=50, replicas=2, stages=2, shards=2, seed=7,
                             optimizer="adagrad", checkpoint_dir=tmp_path,
                             progress=progress, runtime=runtime)  # fmt: skip
        assert signal.getsignal(signal.SIGTERM) is not previous  # still the test's handler
    finally:
        handler = signal.signal(signal.SIGTERM, previous)
    assert seen == []
    stop = info.value
    assert stop.signum == signal.SIGTERM
    assert reports[-1].examples < 50 * 256 // 4  # stopped early (Ray reports every ~400 examples)
    trained = flatten(stop.model.children())
    assert torch.isfinite(trained).all()
    assert not torch.equal(trained, flatten(model.children()))  # kept what it trained
    assert handler is not signal.SIG_DFL  # the run put the test's handler back
    # A last checkpoint was written on the way out, the newest (and, keep=1, the only) one:
    # the model kept is its parameters, and it is at the step it says.
    ckpt = checkpoint.load(tmp_path)
    assert [ckpt.path] == checkpoint.checkpoints(tmp_path) and str(ckpt.path) == stop.checkpoint
    assert torch.equal(ckpt.weights, trained)
    assert sum(p["steps"] for p in ckpt.positions.values()) == stop.step > 0
    # No position is ahead of what its replica pushed: every step before it pushed (n_push 1)
    # every segment of its replica (2 stages over 2 shards), and those updates are in.
    segments = sum(len(s.versions) for s in ckpt.shards)
    assert ckpt.update >= stop.step * segments
    assert all(s.optimizer for s in ckpt.shards)  # Adagrad's sums are there


def test_a_stop_before_any_step_writes_no_checkpoint(tmp_path):
    # SIGTERM before any step: the master's StartReplica is lost on its way (so no replica
    # ever starts) and the signal comes with it. The stop's round finds every position at
    # step 0, so nothing new is written, and the model kept is the initial one.
    def tap(sender, receiver, message):
        if isinstance(message, StartReplica):
            signal.raise_signal(signal.SIGTERM)
            return False
        return None

    model = mlp([10, 16, 3])
    with pytest.raises(distbelief.TrainingInterrupted) as info:
        distbelief.train(model, _toy_data(), loss="cross_entropy", lr=0.1, batch_size=16,
                         epochs=5, replicas=2, shards=2, checkpoint_dir=tmp_path,
                         runtime_options={"tap": tap})  # fmt: skip
    assert info.value.signum == signal.SIGTERM
    assert info.value.checkpoint is None and info.value.step is None
    assert checkpoint.checkpoints(tmp_path) == []
    assert torch.equal(flatten(info.value.model.children()), flatten(model.children()))


def test_the_stops_checkpoint_is_the_last_one_the_master_writes():
    # A periodic round is under way when the stop's round is asked for; the stop's is written
    # (and waited for) and answered to the driver; then no round is written over it: not the
    # periodic one (superseded), not one that comes due, not the end-of-run one.
    told, submitted, joined = [], [], []

    class Ctx:
        name, self_ref = "master", "master"

        def tell(self, ref, message) -> None:
            told.append((ref, message))

    class Writer:
        def submit(self, update, shards, positions, *, wait) -> bool:
            submitted.append((update, wait))
            return True

        def written_at(self, update):
            return Path(f"ck/ckpt-{update}")

        def join(self) -> None:
            joined.append(len(submitted))

    def state(updates: int) -> checkpoint.ShardState:
        return checkpoint.ShardState(0, torch.full((2,), float(updates)), None, {0: updates},
                                     {"updates_applied": updates})  # fmt: skip

    def answer(tag: int, steps: int) -> None:
        master.receive(DataPosition(0, tag, 0, steps, steps, 10 * steps), "data0")
        master.receive(CheckpointMarked(tag, 0), "shard0")
        master.receive(ShardStateReply(0, tag, state(steps)), "shard0")

    master = DownpourMaster(1, 0, 1000, None, 0, 10, checkpointer=Writer(), checkpoint_every=5,
                            checkpoint_marks=1)  # fmt: skip
    master.bind(Ctx())
    master.receive(ConnectMaster(("data0",), ("shard0",)), None)
    coordinator = master.checkpoints
    periodic = coordinator.start()
    master.receive(StopCheckpoint(), "driver")
    stop = periodic + 1
    assert told[-1] == ("data0", CheckpointRequest(stop))
    answer(stop, 7)
    assert submitted == [(7, True)]
    assert joined == [1]  # every write over before the answer, none landing after it
    assert told[-1][0] == "driver" and isinstance(told[-1][1], StopCheckpointTaken)
    taken = told[-1][1]
    assert (taken.path, taken.steps, taken.weights.tolist()) == ("ck/ckpt-7", 7, [7.0, 7.0])
    told.clear()
    answer(periodic, 5)  # complete after the stop's: superseded
    coordinator.on_steps(100, running=True)  # due, but no round starts after the stop's
    assert told == []
    coordinator.start_final()  # the run's end came meanwhile: it finishes, writing nothing
    final = coordinator.final_tag
    master.receive(DataPosition(0, final, 0, 9, 9, 90), "data0")
    master.receive(CheckpointMarked(final, 0), "shard0")
    assert coordinator.on_shard_state(ShardStateReply(0, final, state(9)), diverged=False)
    assert submitted == [(7, True)]


@pytest.mark.slow
def test_the_commands_stop_line_names_the_checkpoint_it_resumes_from(capsys, monkeypatch, tmp_path):
    # The command stopped by SIGTERM (in-process: the signal raised at its second progress
    # report) says where its last checkpoint is; that checkpoint holds the model the API kept,
    # and the command it names resumes from it.
    real_train = cli.train
    kept = []

    def train_then_sigterm(*args, progress, **kw):
        reports = []

        def hook(report) -> None:
            progress(report)
            reports.append(report)
            if len(reports) == 2:
                signal.raise_signal(signal.SIGTERM)

        try:
            return real_train(*args, progress=hook, **kw)
        except distbelief.TrainingInterrupted as stop:
            kept.append(stop)
            raise

    monkeypatch.setattr(cli, "train", train_then_sigterm)
    ck = tmp_path / "ck"
    flags = ["train", "xor", "--train-size", "2000", "--replicas", "2", "--epochs", "3",
             "--no-run-dir", "--checkpoint-dir", str(ck), "--checkpoint-every", "40"]  # fmt: skip
    assert main(flags) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    stop = kept[0]
    ckpt = checkpoint.load(ck)
    steps = sum(p["steps"] for p in ckpt.positions.values())
    assert err == (
        f"distbelief: error: stopped by SIGTERM: checkpoint at step {steps} in {ck}; "
        f"resume with distbelief train --resume {ck}"
    )
    assert str(ckpt.path) == stop.checkpoint and stop.step == steps
    assert torch.equal(ckpt.weights, flatten(stop.model.children()))
    monkeypatch.setattr(cli, "train", real_train)
    assert main(["train", "--resume", str(ck), "--no-run-dir", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["resumed_from_update"] == ckpt.update
    assert resumed["examples"] == 3 * 2000 - sum(p["examples"] for p in ckpt.positions.values())


def test_sandblaster_stopped_mid_step_checkpoints_that_steps_end(tmp_path):
    # L-BFGS state only exists whole at a step's end: the step under way when SIGTERM comes
    # ends, its checkpoint is written, and the model kept is its parameters; resumed, the run
    # ends as the uninterrupted one does.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64)
    data = (x, (x[:, :10].argmax(1) + (x[:, 10] > 0).long()) % 10)
    kw = dict(loss="cross_entropy", algorithm="sandblaster", seed=0, history=5, replicas=2,
              shards=2, portions=4, steps=10)  # fmt: skip
    reports = []

    def progress(report) -> None:
        reports.append(report)
        if len(reports) == 3:
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(distbelief.TrainingInterrupted) as info:
        distbelief.train(logistic(), data, checkpoint_dir=tmp_path, checkpoint_every=100,
                         progress=progress, **kw)  # fmt: skip
    stop = info.value
    ckpt = checkpoint.load(tmp_path)  # the stop's (with checkpoint_every=100, the only one)
    assert str(ckpt.path) == stop.checkpoint
    assert stop.step == ckpt.update == ckpt.manifest["coordinator"]["step"]
    assert 3 <= stop.step < 10  # the step under way at the stop (or the one just ended)
    assert torch.equal(ckpt.weights, flatten(stop.model.children()))
    resumed = distbelief.train(logistic(), data, resume=tmp_path, **kw)
    full = distbelief.train(logistic(), data, **kw)
    assert resumed.stats["resumed_from_step"] == stop.step
    assert resumed.stats["final_loss"] == pytest.approx(full.stats["final_loss"], rel=1e-9)


def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _at_least(n: int, found: set[int]) -> set[int] | None:
    return found if len(found) >= n else None


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a dead child nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # polling a condition with a deadline, not a sleep as synchronisation
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


SHM = Path("/dev/shm")


def _shm_held(pids) -> set[str]:
    """The /dev/shm files the processes ``pids`` map or hold open, as /proc names them (one
    removed from /dev/shm ends in " (deleted)"): the run's own entries, whatever their names."""
    held = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(None, 5)[5:]
                if path and path[0].startswith("/dev/shm/"):
                    held.add(path[0])
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    held.add(target)
        except OSError:  # gone meanwhile
            continue
    return held


def _shm_named_by(pids) -> list[str]:
    """Entries of /dev/shm whose name holds one of ``pids``: torch names its shared segments
    ``torch_<pid>_...`` and multiprocessing its arenas ``pym-<pid>-...`` (the pid of the
    process that made them), the per-run prefix of a ``processes`` run's entries."""
    pids = "|".join(str(p) for p in pids)
    pattern = re.compile(rf"(?<!\d)({pids})(?!\d)")
    return sorted(e.name for e in SHM.iterdir() if pattern.search(e.name))


def _shm_left(held: set[str]) -> list[str]:
    """Which of the entries ``held`` (as :func:`_shm_held` names them) are in /dev/shm."""
    return sorted(h for h in held if Path(h.removesuffix(" (deleted)")).exists())


def _check_stop_line(err: str, root: Path) -> None:
    """The command's last line names the checkpoint written on the way out, which is the
    newest (and only) one in ``root``, at the step it says."""
    last = err.strip().splitlines()[-1]
    where = re.escape(str(root))
    match = re.fullmatch(
        rf"distbelief: error: stopped by SIGTERM: checkpoint at step (\d+) in {where}; "
        rf"resume with distbelief train --resume {where}",
        last,
    )
    assert match, last
    ckpt = checkpoint.load(root)
    assert checkpoint.checkpoints(root) == [ckpt.path]
    assert sum(p["steps"] for p in ckpt.positions.values()) == int(match.group(1)) > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "runtime", ["local", pytest.param("processes", marks=pytest.mark.processes)]
)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_nothing_of_a_run_outlives_its_driver(tmp_path, runtime, sig):
    # A run far longer than the test, stopped once it has written a checkpoint (so it is
    # training) and, on processes, its workers are running (one per replica, at most one per
    # CPU). Its own processes are the driver and its descendants; its own /dev/shm entries
    # are those they map or hold open (on processes: torch's segments and multiprocessing's
    # arena, named torch_<driver pid>_... and pym-<driver pid>-..., and a semaphore). On
    # processes the driver also has its fork server (which forks replacement workers).
    expected = min(2, os.cpu_count() or 1) + 1 if runtime == "processes" else 0
    root = tmp_path / "ck"
    cmd = [sys.executable, "-m", "distbelief", "train", "--runtime", runtime,
           "--replicas", "2", "--stages", "1", "--shards", "1", "--epochs", "500", "--seed", "0",
           "--no-run-dir", "--quiet", "--checkpoint-dir", str(root),
           "--checkpoint-every", "50"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        workers = set()
        if expected:
            workers = _wait_for(lambda: _at_least(expected, _children(driver.pid)), 120, "workers")
        _wait_for(lambda: checkpoint.checkpoints(root), 120, "a first checkpoint")
        run = {driver.pid, *workers, *(p for w in workers for p in _children(w))}
        assert len(run) == 1 + expected  # the driver, its workers (and fork server), no more
        held = _shm_held(run)
        # Shared memory is removed from /dev/shm as it is made: nothing of the run is there
        # even while it runs, so nothing can be left behind.
        assert bool(held) == (runtime == "processes")
        assert all(h.endswith(" (deleted)") for h in held), held
        assert _shm_left(held) == [] and _shm_named_by(run) == []
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=60)
        if sig == signal.SIGTERM:
            assert driver.returncode == 128 + signal.SIGTERM, err
            _check_stop_line(err, root)
        else:
            assert driver.returncode == -signal.SIGKILL
        _wait_for(lambda: not any(_running(p) for p in run), GONE_WITHIN_S, "the run's processes")
        assert _shm_left(held) == [] and _shm_named_by(run) == []
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_nothing_of_a_ray_run_outlives_its_driver(sig):
    pytest.importorskip("ray", reason="the Ray runtime needs the 'ray' extra")
    from distbelief.runtime.ray.watchdog import instance_processes

    # A short temp dir of the run's own (Ray's socket paths must stay under 108 bytes); the
    # driver's private Ray instance keeps its files in a distbelief-ray-* dir inside it.
    tmp = tempfile.mkdtemp(prefix="db-stop-", dir="/tmp")
    root = Path(tmp) / "ck"
    cmd = [sys.executable, "-m", "distbelief", "train", "--runtime", "ray", "--replicas", "1",
           "--stages", "1", "--shards", "1", "--epochs", "500", "--seed", "0", "--no-run-dir",
           "--quiet", "--checkpoint-dir", str(root), "--checkpoint-every", "50"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp}
    driver = subprocess.Popen(
        cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        instance = _wait_for(lambda: list(Path(tmp).glob("distbelief-ray-*")), 120, "Ray")[0]

        def hosts_running() -> bool:  # the run's actors are up: it is training
            for pid in instance_processes(str(instance)):
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_Host"):
                        return True
                except OSError:
                    pass
            return False

        _wait_for(hosts_running, 180, "the run's actors")
        _wait_for(lambda: checkpoint.checkpoints(root), 120, "a first checkpoint")
        processes = {driver.pid, *instance_processes(str(instance))}
        # Ray's object store is a file in /dev/shm (plasmaXXXXXX, no per-run name), removed
        # as it is made: the run's processes map it, but nothing of it is there to be left.
        held = _shm_held(processes)
        assert held and all(h.endswith(" (deleted)") for h in held), held
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=60)
        if sig == signal.SIGTERM:
            assert driver.returncode == 128 + signal.SIGTERM, err
            _check_stop_line(err, root)
        else:
            assert driver.returncode == -signal.SIGKILL
        _wait_for(lambda: not any(_running(p) for p in processes), GONE_WITHIN_S, "Ray's processes")
        _wait_for(lambda: not instance.exists(), GONE_WITHIN_S, f"{instance} to be removed")
        assert _shm_left(held) == []
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        shutil.rmtree(tmp, ignore_errors=True)
