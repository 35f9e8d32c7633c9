"""Checkpoint writes a run can survive: a disk that fills up mid-run; and a resume that has
nothing left to train, which writes nothing."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support import mlp

import distbelief
from distbelief.cli import main
from distbelief.results import ProgressReport
from distbelief.storage import checkpoint

KW = dict(loss="cross_entropy", lr=0.05, batch_size=16, optimizer="adagrad", seed=3)


def toy_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (skipped where mounting is not allowed)."""
    where = tmp_path / "disk"
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Write zeros into ``path`` until the file system is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert shutil.disk_usage(path.parent).free < 65536


def test_a_disk_that_fills_up_mid_run_ends_with_the_run_complete(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = small_disk / "ck"
    filled_at = []

    def progress(report: ProgressReport) -> None:
        # From half-way, once a checkpoint is whole on disk (they are written in a thread of
        # their own: the first may still be on its way at half-way), the disk fills up.
        half = report.examples >= report.total_examples // 2
        if half and not filled_at and checkpoint.checkpoints(root):
            fill(small_disk / "filler")
            filled_at.append(report.examples)

    caplog.set_level(logging.WARNING, logger="distbelief")
    result = distbelief.train(mlp([10, 32, 2]), toy_data(), epochs=4, shards=2,
                              checkpoint_dir=root, checkpoint_every=8, progress=progress,
                              **KW)  # fmt: skip
    stats = result.stats
    assert filled_at and filled_at[0] < 4 * 512, "the disk never filled before the run ended"
    assert result.history.final_loss is not None and stats["examples"] == 4 * 512
    assert stats["checkpoint_writes_skipped"] > 0 and stats["checkpoints_written"] >= 1
    ckpt = checkpoint.load(root)  # the last whole one, verified
    assert str(ckpt.path) == stats["last_checkpoint"]
    assert ckpt.update < stats["updates_applied_total"]  # the final one could not be written
    warned = [r for r in caplog.records if "checkpoint_writes_skipped" in r.getMessage()]
    assert len(warned) == 1  # warned once, however many writes failed


# ------------------------------------------------------------------ nothing left to train

TINY = ("train", "digits", "--epochs", "2", "--replicas", "1", "--stages", "1", "--shards",
        "1", "--hidden", "16", "--seed", "7", "--no-run-dir")  # fmt: skip


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("epochs", [[], ["--epochs", "1"]])
def test_resuming_a_finished_run_trains_nothing_and_writes_nothing(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    epochs: list[str],
) -> None:
    root = tmp_path / "ck"
    assert main([*TINY, "--checkpoint-dir", str(root), "--quiet"]) == 0
    before = digest(root)
    monkeypatch.chdir(tmp_path)  # a default run directory would go into ./runs
    capsys.readouterr()
    flags = ["train", "--resume", str(root), *epochs]
    assert main([*flags]) == 0
    out, err = capsys.readouterr()
    assert "nothing to train: the checkpoint is at epoch 2 of " in err + out
    assert f"of {epochs[1] if epochs else 2}" in err + out
    assert digest(root) == before  # byte-identical: no checkpoint, no progress note
    assert not (tmp_path / "runs").exists()
    assert main([*flags, "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["nothing_to_train"] and s["examples"] == 0
    # and through the API: an error to catch (there is no result), nothing written either
    distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=1, checkpoint_dir=tmp_path / "a",
                     **KW)  # fmt: skip
    before = digest(tmp_path / "a")
    with pytest.raises(distbelief.NothingToTrain, match="epochs: nothing to train"):
        distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=1, resume=tmp_path / "a",
                         checkpoint_dir=tmp_path / "a", **KW)  # fmt: skip
    assert digest(tmp_path / "a") == before
