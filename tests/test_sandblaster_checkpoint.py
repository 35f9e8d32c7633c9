"""Sandblaster's checkpoints: the coordinator's state and every shard's slice of every vector,
in Downpour's format; a run killed with SIGKILL resumes to the uninterrupted run's loss."""

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
import torch.nn.functional as F
from support import logistic
from torch import nn

import distbelief
from distbelief import ConfigError, NothingToTrain
from distbelief.cli import main
from distbelief.storage import checkpoint

KW = dict(loss="cross_entropy", algorithm="sandblaster", seed=0, history=10, replicas=3,
          shards=2, portions=6)  # fmt: skip

CHILD = f"""
import sys, torch
from torch import nn
import distbelief
from distbelief.data.inputs import mnist1d
(x, y), _ = mnist1d()
model = nn.Sequential(nn.Linear(40, 10, dtype=torch.float64))
with torch.no_grad():
    for p in model.parameters():
        p.zero_()
distbelief.train(model, (x[:1000].double(), y[:1000]), steps=40, checkpoint_dir=sys.argv[1],
                 checkpoint_every=1, runtime_options={{"faults": ["delay:shard0=3ms"]}},
                 **{repr(KW)})
"""


@pytest.fixture(scope="module")
def convex(mnist1d_data):
    (x, y), _ = mnist1d_data
    return x[:1000].double(), y[:1000]


def full_loss(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(data[0]), data[1]))


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_runs_loss(
    convex, tmp_path: Path
) -> None:
    root = tmp_path / "ck"
    # Slowed (3 ms a message to shard0; in one thread the result is that of the run without
    # the delay) so that the kill lands mid-run.
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while len(checkpoint.checkpoints(root)) == 0 or checkpoint.load(root).update < 4:
            assert proc.poll() is None, "the run ended before its 4th step's checkpoint"
            assert time.monotonic() < deadline, "no checkpoint of step 4 within 180 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ckpt = checkpoint.load(root)
    killed_at = ckpt.manifest["coordinator"]["step"]
    assert ckpt.update == killed_at and ckpt.manifest["config"]["algorithm"] == "sandblaster"

    full = distbelief.train(logistic(), convex, steps=40, **KW)
    assert killed_at < full.stats["steps"]  # killed before the end
    resumed = distbelief.train(logistic(), convex, steps=40, resume=root, **KW)
    assert resumed.stats["resumed_from_step"] == killed_at
    assert resumed.stats["steps"] == full.stats["steps"]
    assert abs(full_loss(resumed.model, convex) - full_loss(full.model, convex)) <= 1e-6
    assert len(resumed.history.train) == full.stats["steps"] - killed_at  # this run's steps


def test_refusals_nothing_to_train_and_the_command(
    convex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ck"
    first = distbelief.train(logistic(), convex, steps=3, checkpoint_dir=root, **KW)
    assert first.stats["checkpoints_written"] == 3  # every step (an epoch: the whole batch)
    ckpt = checkpoint.load(root)
    assert ckpt.update == 3 and len(ckpt.shards) == 2
    assert {"g", "d"} <= set(ckpt.shards[0].optimizer)  # every vector, not only "x"
    with pytest.raises(NothingToTrain, match="steps: nothing to train: .* at step 3 of 3"):
        distbelief.train(logistic(), convex, steps=3, resume=root, **KW)
    with pytest.raises(ConfigError, match="history: .* history 10, this run has 5"):
        distbelief.train(logistic(), convex, steps=9, resume=root, **{**KW, "history": 5})
    with pytest.raises(ConfigError, match="was taken with 2 shards"):
        distbelief.train(logistic(), convex, steps=9, resume=root, **{**KW, "shards": 3})
    with pytest.raises(ConfigError, match="is a Sandblaster checkpoint"):
        distbelief.train(logistic(), convex, loss="cross_entropy", lr=0.1, batch_size=50,
                         epochs=1, resume=root, seed=0)  # fmt: skip

    # the command: checkpoints into the run directory by default, and --resume
    flags = ["train", "digits", "--algorithm", "sandblaster", "--steps", "3", "--hidden", "8",
             "--seed", "1", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main([*flags, "--run-dir", str(tmp_path / "run")]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["last_checkpoint"].startswith(str(tmp_path / "run" / "checkpoints"))
    run_ck = tmp_path / "run" / "checkpoints"
    assert main(["train", "--resume", str(run_ck), "--steps", "5", "--no-run-dir", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["resumed_from_step"] == 3 and s["algorithm"] == "sandblaster"
    assert main(["train", "--resume", str(run_ck), "--steps", "5", "--no-run-dir"]) == 0
    assert "nothing to train: the checkpoint is at step 5 of 5" in capsys.readouterr().err
