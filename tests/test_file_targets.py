"""Your own data (README, *Your own data*): ``--target LABELS.npy``, the 0..999 boundary
between classification and regression, and the evaluation of a test file chunk by chunk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import mlp

import distbelief
from distbelief.cli import main
from distbelief.data.formats import FileData
from distbelief.data.inputs import files


def run_json(capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    capsys.readouterr()
    code = main(["train", *flags, "--no-run-dir", "--json", "--replicas", "1", "--stages", "1",
                 "--shards", "1", "--seed", "0", "--hidden", "16"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_target_labels_npy_takes_the_labels_from_that_file(capsys, tmp_path: Path) -> None:
    """x.npy has a y.npy beside it (float targets: a regression); ``--target labels.npy``
    names 4 classes that are a function of the inputs: the run classifies, and learns them."""
    g = np.random.default_rng(0)
    x = g.standard_normal((800, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", g.standard_normal(800))  # what --target must override
    np.save(tmp_path / "labels.npy", np.argmax(x[:, :4], axis=1))
    s = run_json(capsys, "--data", str(tmp_path / "x.npy"), "--target",
                 str(tmp_path / "labels.npy"), "--test-split", "0.25", "--epochs", "5")  # fmt: skip
    assert s["task"] == "classify"
    assert s["test_accuracy"] >= 0.8  # 0.965 here; chance is 0.25, y.npy would be regressed


@pytest.mark.parametrize(
    "labels, task, outputs",
    [
        (np.arange(200) % 1000 * 5 % 1000, "classify", 996),  # largest label 995
        (np.r_[np.arange(199) % 3, 999], "classify", 1000),  # 999: still a class
        (np.r_[np.arange(199) % 3, 1000], "regress", 1),  # 1000: no longer
        (np.r_[np.arange(199) % 3, -1], "regress", 1),  # a negative label
        (np.r_[np.arange(199) % 3, 2].astype(np.float64), "classify", 3),  # whole, as floats
        (np.r_[np.arange(199) % 3, 2.5], "regress", 1),  # not a whole number
    ],
)
def test_integer_labels_in_0_to_999_are_classes_anything_else_is_regressed(
    capsys, tmp_path: Path, labels, task, outputs
) -> None:
    """What the file says (``files``), and what the command then reports: accuracy for
    classes, none for a regression."""
    g = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", g.standard_normal((200, 3)).astype(np.float32))
    np.save(tmp_path / "y.npy", labels)
    data = files(tmp_path / "x.npy")
    assert (data.task, data.outputs) == (task, outputs)
    s = run_json(capsys, "--data", str(tmp_path / "x.npy"), "--test-split", "0.25",
                 "--epochs", "1")  # fmt: skip
    assert s["task"] == task
    assert (s["test_accuracy"] is None) == (task == "regress")
    assert s["test_loss"] is not None and np.isfinite(s["test_loss"])


def test_a_test_file_is_evaluated_4096_rows_at_a_time_to_the_whole_files_mean(
    monkeypatch, tmp_path: Path
) -> None:
    """A test file of 8,292 rows is read as 4,096 + 4,096 + 100 rows (never whole), and the
    loss and accuracy are those of the whole file in memory: chunk means weighted by size."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8292, 5, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0).long()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    reads: list[int] = []
    read = FileData.read

    def counted(self, rows):
        reads.append(len(rows))
        return read(self, rows)

    monkeypatch.setattr(FileData, "read", counted)
    result = distbelief.train(
        mlp([5, 8, 3]), (x[:512], y[:512]), eval_data=str(tmp_path / "x.npy"),
        loss="cross_entropy", lr=0.1, batch_size=32, epochs=1, seed=0,
    )  # fmt: skip
    assert reads and max(reads) == 4096 and reads[-3:] == [4096, 4096, 100]
    final = result.history.eval[-1]
    model = result.model.eval()
    with torch.no_grad():
        out = model(x)
    assert final["loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert final["accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item(), abs=1e-6)
