"""Checkpoints without any checkpoint flag: a run that writes a run directory checkpoints
every epoch, so the main job killed at about 80% resumes to its band."""

from __future__ import annotations

import json
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
from distbelief.cli import main
from distbelief.storage import checkpoint

MAIN_JOB_EXAMPLES = 8000 * 15  # MNIST-1D's 8,000 training examples, 15 epochs
BAND = (0.69, 0.75)  # the README's band for the main job (0.70-0.74), a point of slack each side


def newest(root: Path) -> checkpoint.Checkpoint | None:
    """The newest whole checkpoint, or None (an older one may vanish while it is read)."""
    try:
        return checkpoint.load(root) if checkpoint.checkpoints(root) else None
    except checkpoint.CheckpointError:
        return None


@pytest.mark.slow
def test_the_main_job_killed_at_80_percent_keeps_a_checkpoint_and_resumes_to_its_band(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    script = Path(sys.executable).with_name("distbelief")
    proc = subprocess.Popen(
        [str(script), "train", "--seed", "1", "--run-dir", str(run), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    root = run / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while True:  # polling the file system, with a deadline
            ckpt = newest(root)
            done = sum(p["examples"] for p in ckpt.positions.values()) if ckpt else 0
            if done >= 0.75 * MAIN_JOB_EXAMPLES:
                break
            assert proc.poll() is None, "the run ended before a checkpoint at 75%"
            assert time.monotonic() < deadline, "no checkpoint at 75% within 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert done < MAIN_JOB_EXAMPLES  # killed before the end: a periodic checkpoint
    assert ckpt.manifest["config"]["checkpoint_every"] == 4 * 63  # an epoch: 4 x 2,000 / 32

    capsys.readouterr()
    assert main(["train", "--resume", str(root), "--no-run-dir", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["resumed_from"] == str(ckpt.path)
    assert s["examples"] == MAIN_JOB_EXAMPLES - done  # only what the kill lost is trained
    assert BAND[0] <= s["test_accuracy"] <= BAND[1], s["test_accuracy"]


def test_the_default_period_is_an_epoch_and_zero_keeps_the_final_one_only(tmp_path: Path) -> None:
    x = torch.randn(256, 10, generator=torch.Generator().manual_seed(0))
    data = (x, (x[:, 0] > 0).long())
    kw = dict(loss="cross_entropy", lr=0.05, batch_size=16, epochs=3, replicas=2, seed=0)
    result = distbelief.train(mlp([10, 8, 2]), data, run_dir=tmp_path / "run", **kw)
    assert result.stats["checkpoints_written"] == 3  # epochs 1 and 2, and the final one
    assert (
        checkpoint.load(tmp_path / "run" / "checkpoints").manifest["config"]["checkpoint_every"]
        == 16
    )  # 2 replicas x 128 examples / 16
    again = distbelief.train(mlp([10, 8, 2]), data, checkpoint_dir=tmp_path / "b", **kw)
    assert torch.equal(
        torch.cat([p.flatten() for p in again.model.parameters()]),
        torch.cat([p.flatten() for p in result.model.parameters()]),
    )  # same seed, in-process: bit-identical with the default on
    final = distbelief.train(mlp([10, 8, 2]), data, checkpoint_dir=tmp_path / "c",
                             checkpoint_every=0, **kw)  # fmt: skip
    assert final.stats["checkpoints_written"] == 1
