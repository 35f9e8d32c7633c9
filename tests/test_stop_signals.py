"""SIGTERM stops a run as Ctrl-C does, and no worker outlives its driver.

A run stopped by SIGTERM keeps what it trained (``TrainingInterrupted`` with ``signum``), the CLI
exits 143, and every worker process of the run is gone within 5 s of its driver's death, whether
the driver stopped cleanly (SIGTERM) or was killed (SIGKILL, where only the kernel's parent-death
signal can end the workers).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from support import mlp

import distbelief
from distbelief.core.flat import flatten

GONE_WITHIN_S = 5.0


def _toy_data(n: int = 256):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_sigterm_stops_training_and_keeps_what_was_trained(runtime):
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
                             progress=progress, runtime=runtime)  # fmt: skip
        assert signal.getsignal(signal.SIGTERM) is not previous  # still the test's handler
    finally:
        handler = signal.signal(signal.SIGTERM, previous)
    assert seen == []
    assert info.value.signum == signal.SIGTERM
    assert reports[-1].examples < 50 * 256 // 4  # stopped early (Ray reports every ~400 examples)
    trained = flatten(info.value.model.children())
    assert torch.isfinite(trained).all()
    assert not torch.equal(trained, flatten(model.children()))  # kept what it trained
    assert handler is not signal.SIG_DFL  # the run put the test's handler back


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


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_no_worker_of_a_processes_run_outlives_its_driver(tmp_path, sig):
    # A run far longer than the test: it is stopped once its workers are running (one per
    # replica, at most one per CPU).
    expected = min(2, os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "distbelief", "train", "--runtime", "processes",
           "--replicas", "2", "--stages", "1", "--shards", "1",
           "--epochs", "500", "--seed", "0", "--no-run-dir", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        workers = _wait_for(lambda: _at_least(expected, _children(driver.pid)), 120, "workers")
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=30)
        if sig == signal.SIGTERM:
            assert driver.returncode == 128 + signal.SIGTERM, err
            assert err.strip().splitlines()[-1] == "distbelief: error: stopped by SIGTERM"
        else:
            assert driver.returncode == -signal.SIGKILL
        _wait_for(lambda: not any(_running(w) for w in workers), GONE_WITHIN_S, "the workers")
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
    cmd = [sys.executable, "-m", "distbelief", "train", "--runtime", "ray", "--replicas", "2",
           "--stages", "1", "--shards", "1", "--epochs", "500", "--seed", "0", "--no-run-dir",
           "--quiet"]  # fmt: skip
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
        processes = instance_processes(str(instance))
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=60)
        if sig == signal.SIGTERM:
            assert driver.returncode == 128 + signal.SIGTERM, err
        else:
            assert driver.returncode == -signal.SIGKILL
        _wait_for(lambda: not any(_running(p) for p in processes), GONE_WITHIN_S, "Ray's processes")
        _wait_for(lambda: not instance.exists(), GONE_WITHIN_S, f"{instance} to be removed")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        shutil.rmtree(tmp, ignore_errors=True)
