"""One run at a time per checkpoint directory and per run directory: a second run is refused
naming the holder's pid; a lock left by a SIGKILLed run is taken over with a warning."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import mlp

import distbelief
from distbelief import ConfigError
from distbelief.cli import main
from distbelief.storage.dirlock import LOCK, DirectoryLock

KW = dict(loss="cross_entropy", lr=0.05, batch_size=16, optimizer="adagrad", seed=3)


def toy_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


TINY = ("train", "digits", "--epochs", "1", "--replicas", "1", "--stages", "1", "--shards",
        "1", "--hidden", "16", "--seed", "7")  # fmt: skip


def wait_for_lock(path: Path, pid: int, proc: subprocess.Popen) -> None:
    """Poll until ``path`` names ``pid`` (the file system, with a deadline)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if json.loads(path.read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, "the first run ended before it locked its directories"
        assert time.monotonic() < deadline, f"{path} not written within 120 s"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ck, run = tmp_path / "ck", tmp_path / "run"
    script = Path(sys.executable).with_name("distbelief")
    first = subprocess.Popen(
        [str(script), *TINY, "--epochs", "2000", "--checkpoint-dir", str(ck), "--run-dir",
         str(run), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_lock(ck / LOCK, first.pid, first)
        wait_for_lock(run / LOCK, first.pid, first)
        for flags, where in (
            (["--run-dir", str(run)], run),  # the same run directory
            (["--no-run-dir", "--checkpoint-dir", str(ck)], ck),  # the same checkpoints
        ):
            capsys.readouterr()
            code = main([*TINY, *flags])
            err = capsys.readouterr().err.strip()
            assert code == 2 and len(err.splitlines()) == 1, err
            assert str(where) in err and f"pid {first.pid}" in err, err
        assert first.poll() is None  # the first run went on
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert json.loads((ck / LOCK).read_text())["pid"] == first.pid  # left behind by the kill

    caplog.set_level(logging.WARNING, logger="distbelief")
    capsys.readouterr()
    assert main([*TINY, "--no-run-dir", "--checkpoint-dir", str(ck), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["last_checkpoint"]
    warned = [r.getMessage() for r in caplog.records if "no longer running" in r.getMessage()]
    assert len(warned) == 1 and f"pid {first.pid}" in warned[0] and str(ck) in warned[0]
    assert not (ck / LOCK).exists()  # released at the end


def test_two_runs_in_one_process_and_the_lock_released_after_a_failed_run(
    tmp_path: Path,
) -> None:
    with DirectoryLock(tmp_path, "checkpoint_dir"):
        with pytest.raises(ConfigError, match=f"checkpoint_dir: {tmp_path} .*pid {os.getpid()}"):
            distbelief.train(mlp([10, 4, 2]), toy_data(64), epochs=1, checkpoint_dir=tmp_path,
                             **KW)  # fmt: skip
    with pytest.raises(ConfigError, match="replicas"):  # refused after the lock was taken
        distbelief.train(mlp([10, 4, 2]), toy_data(64), epochs=1, checkpoint_dir=tmp_path,
                         replicas=1000, **KW)  # fmt: skip
    distbelief.train(mlp([10, 4, 2]), toy_data(64), epochs=1, checkpoint_dir=tmp_path, **KW)
    assert not (tmp_path / LOCK).exists()
