"""Hostile and unusual inputs (issue 20): no silent wrong answer from a data file, and one
clear line (exit 2 on the command line, ConfigError in the API) for every bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support import mlp, run

import distbelief
import distbelief.cli
from distbelief import ConfigError
from distbelief.data.inputs import files

FAST = ["--epochs", "2", "--replicas", "1", "--stages", "1", "--shards", "1", "--seed", "0",
        "--no-run-dir", "--batch-size", "16", "--hidden", "8"]  # fmt: skip


def train_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, "train", *argv, *FAST, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``distbelief train ARGV``; it must exit 2 with one line and no traceback."""
    code, out, err = run(capsys, "train", *argv, *FAST)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("distbelief: error: "), lines[0]
    return lines[0]


def write_csv(path: Path, header: list[str], rows: np.ndarray, label: Any = int) -> Path:
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join([*(repr(float(v)) for v in row[:-1]), str(label(row[-1]))]) + "\n")
    return path


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    """400 rows of four features a..d and a label that depends on a and b."""
    rng = np.random.default_rng(0)
    x = rng.random((400, 4))
    y = ((x[:, 0] > 0.5) ^ (x[:, 1] > 0.7)).astype(float)
    return np.column_stack([x, y])


# ---------------------------------------------------------------- 1: columns matched by name


def test_a_test_file_with_columns_in_another_order_is_matched_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: np.ndarray
) -> None:
    # The same rows with the columns reversed must test exactly as the training file does.
    train = write_csv(tmp_path / "a.csv", ["a", "b", "c", "d", "label"], table)
    same = write_csv(tmp_path / "same.csv", ["a", "b", "c", "d", "label"], table)
    reordered = write_csv(
        tmp_path / "b.csv", ["d", "c", "b", "a", "label"], table[:, [3, 2, 1, 0, 4]]
    )
    expected = train_json(capsys, "--data", str(train), "--test-data", str(same))
    got = train_json(capsys, "--data", str(train), "--test-data", str(reordered))
    assert got["test_loss"] == expected["test_loss"]
    assert got["test_accuracy"] == expected["test_accuracy"]
    # Parquet too, and the API with eval_data a path.
    columns = {"c": table[:, 2], "a": table[:, 0], "label": table[:, 4].astype(np.int64),
               "d": table[:, 3], "b": table[:, 1]}  # fmt: skip
    pq.write_table(pa.table(columns), tmp_path / "b.parquet")
    got = train_json(capsys, "--data", str(train), "--test-data", str(tmp_path / "b.parquet"))
    assert got["test_loss"] == expected["test_loss"]

    def api(eval_data: Any) -> tuple[float | None, float | None]:
        result = distbelief.train(mlp([4, 8, 2]), str(train), eval_data=eval_data,
                                  loss="cross_entropy", lr=0.05, batch_size=16, epochs=1,
                                  seed=0)  # fmt: skip
        return result.history.final_loss, result.history.accuracy

    assert api(str(reordered)) == api(str(same))
    assert api(files(reordered)) == api(str(same))


def test_a_test_file_missing_or_adding_a_column_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: np.ndarray
) -> None:
    train = write_csv(tmp_path / "a.csv", ["a", "b", "c", "d", "label"], table)
    other = write_csv(tmp_path / "o.csv", ["a", "b", "c", "e", "label"], table)
    line = one_line_error(capsys, "--data", str(train), "--test-data", str(other))
    assert "test-data: " in line and "o.csv: no column 'd'" in line
    wide = write_csv(tmp_path / "w.csv", ["a", "b", "c", "d", "e", "label"],
                     np.column_stack([table[:, :4], table]))  # fmt: skip
    line = one_line_error(capsys, "--data", str(train), "--test-data", str(wide))
    assert "w.csv: column 'e' is not in the training data" in line
    with pytest.raises(ConfigError, match=r"^eval_data: .*o.csv: no column 'd'"):
        distbelief.train(mlp([4, 2]), str(train), eval_data=str(other), loss="cross_entropy",
                         lr=0.05, batch_size=16, epochs=1)  # fmt: skip


# ---------------------------------------------------------------- 2: the task and why


def test_labels_written_as_floats_are_classes_and_the_command_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: np.ndarray
) -> None:
    path = write_csv(tmp_path / "f.csv", ["a", "b", "c", "d", "label"], table, label=float)
    assert "1.0" in path.read_text().splitlines()[1:][table[:, 4].argmax()]
    assert files(path).task == "classify"
    code, out, err = run(capsys, "train", "--data", str(path), "--test-split", "0.25", *FAST)
    assert code == 0, err
    assert "task classify, inferred: the labels are whole numbers from 0 to 1" in err
    assert "--task regress" in err
    assert "the labels are whole numbers" in out  # the summary's task row
    s = train_json(capsys, "--data", str(path), "--test-split", "0.25")
    assert s["task"] == "classify" and s["test_accuracy"] is not None
    assert s["task_reason"].startswith("the labels are whole numbers")
    # A fractional label makes it regression, and the line names it and the other flag.
    frac = table.copy()
    frac[5, 4] = 0.5
    path = write_csv(tmp_path / "r.csv", ["a", "b", "c", "d", "label"], frac, label=float)
    code, out, err = run(capsys, "train", "--data", str(path), *FAST)
    assert code == 0, err
    assert "task regress, inferred: label 0.5 (" in err and "line 7) is not a whole number" in err
    assert "--task classify" in err


# ---------------------------------------------------------------- 4, 5, 8, 9: one line each


def test_a_huge_class_label_is_refused_naming_it_and_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: np.ndarray
) -> None:
    big = table.copy()
    big[9, 4] = 1_000_000
    path = write_csv(tmp_path / "big.csv", ["a", "b", "c", "d", "label"], big)
    line = one_line_error(capsys, "--data", str(path), "--task", "classify")
    assert "big.csv line 11: label 1000000 implies 1,000,001 classes for 400 examples" in line
    with pytest.raises(ConfigError, match=r"^train_data: .*label 1000000 implies"):
        distbelief.train(mlp([4, 2]), str(path), loss="cross_entropy", lr=0.05, batch_size=16,
                         epochs=1)  # fmt: skip


def test_duplicate_column_names_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: np.ndarray
) -> None:
    path = write_csv(tmp_path / "dup.csv", ["a", "a", "c", "c", "label"], table)
    line = one_line_error(capsys, "--data", str(path))
    assert "dup.csv: column 'a' appears twice (columns 1 and 2)" in line
    with pytest.raises(ConfigError, match=r"^path: .*column 'a' appears twice"):
        files(path)
    pq.write_table(pa.table([table[:, 0], table[:, 1], table[:, 4]], names=["x", "x", "y"]),
                   tmp_path / "dup.parquet")  # fmt: skip
    with pytest.raises(ConfigError, match=r"^path: .*column 'x' appears twice"):
        files(tmp_path / "dup.parquet")


def test_a_csv_with_a_byte_order_mark_reads_as_without(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: np.ndarray
) -> None:
    plain = write_csv(tmp_path / "plain.csv", ["a", "b", "c", "d", "label"], table)
    marked = tmp_path / "marked.csv"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # "CSV UTF-8" from a spreadsheet
    data = files(marked)
    assert data.columns == ("a", "b", "c", "d")
    x, y = data.read(np.arange(400))
    assert torch.equal(x, files(plain).read(np.arange(400))[0])
    s = train_json(capsys, "--data", str(marked), "--target", "label")
    assert s["examples"] == 400 * 2


def test_a_symbolic_link_loop_is_named_as_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loop = tmp_path / "loop.csv"
    os.symlink(loop, loop)
    line = one_line_error(capsys, "--data", str(loop))
    assert "loop.csv: a loop of symbolic links" in line


def test_a_bad_record_spanning_lines_is_named_at_its_first_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Line 3 opens a quoted field that closes on line 4: the record starts on line 3.
    path = tmp_path / "span.csv"
    path.write_text('a,b,label\n1,2,0\n"3\nx",4,1\n5,6,0\n')
    line = one_line_error(capsys, "--data", str(path))
    assert "span.csv line 3, column 'a'" in line
    # A NaN after such a record is on the line the record starts on too.
    path.write_text('a,b,label\n1,2,0\n"3\n",4,1\nnan,6,0\n')
    line = one_line_error(capsys, "--data", str(path))
    assert "span.csv line 5" in line


# ---------------------------------------------------------------- 3: a file that changes


@pytest.mark.parametrize("on", ["local", "processes"])
def test_an_npy_file_truncated_while_training_is_an_error_naming_it_keeping_the_model(
    tmp_path: Path, on: str
) -> None:
    # Mapped, the next read of a vanished page killed the process with SIGBUS (no message).
    rng = np.random.default_rng(0)
    x = rng.random((2000, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", (x[:, 0] > 0.5).astype(np.int64))
    model = mlp([4, 8, 2])
    before = [p.detach().clone() for p in model.parameters()]
    truncated = []

    def shrink(report: Any) -> None:
        if not truncated:  # the first report: the next epoch's read finds the file shorter
            with open(tmp_path / "x.npy", "r+b") as f:
                f.truncate(4096)
            truncated.append(report.examples)

    with pytest.raises(distbelief.DataChanged, match=r"x.npy: the file shrank while training") as e:
        distbelief.train(model, str(tmp_path / "x.npy"), loss="cross_entropy", lr=0.05,
                         batch_size=8, epochs=3, seed=0, progress=shrink, runtime=on)  # fmt: skip
    assert truncated and e.value.model is not None
    trained = list(e.value.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trained))
    assert all(torch.isfinite(p).all() for p in trained)


# ---------------------------------------------------------------- 6, 7, 9: more one-liners


def test_a_binary_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b"lr = 0.1\n\xff\xfe\x00binary")
    line = one_line_error(capsys, "xor", "--config", str(config))
    assert "config: " in line and "c.toml' is not a TOML text file (byte 9 is not UTF-8)" in line


@pytest.mark.parametrize("where", ["inputs", "targets", "model"])
def test_tensors_off_the_cpu_are_refused_naming_the_argument_and_device(where: str) -> None:
    x, y = torch.zeros(8, 2), torch.zeros(8, dtype=torch.long)
    model = mlp([2, 2])
    if where == "inputs":
        x = x.to("meta")
    elif where == "targets":
        y = y.to("meta")
    else:
        model = model.to("meta")
    expected = {
        "inputs": r"^train_data: the inputs are on device 'meta'",
        "targets": r"^train_data: the targets are on device 'meta'",
        "model": r"^model: layer 0 \(Linear\) weight is on device 'meta'",
    }[where]
    with pytest.raises(ConfigError, match=expected):
        distbelief.train(model, (x, y), loss="cross_entropy", lr=0.1, batch_size=2, epochs=1)


def test_sandblaster_trains_on_a_data_file_that_fits_in_memory(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    table: np.ndarray,
) -> None:
    path = write_csv(tmp_path / "a.csv", ["a", "b", "c", "d", "label"], table)
    argv = ["train", "--data", str(path), "--algorithm", "sandblaster", "--replicas", "2",
            "--shards", "1", "--seed", "0", "--no-run-dir", "--hidden", "8", "--json"]  # fmt: skip
    code, out, err = run(capsys, *argv, "--steps", "3", "--test-split", "0.25")
    assert code == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["steps"] >= 1 and s["test_accuracy"] is not None and s["task"] == "classify"
    # A file that would not fit in memory is refused naming the flag, not the API's parameter.
    monkeypatch.setattr(distbelief.cli, "available_memory", lambda: 1000)
    code, out, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("distbelief: error: data: --algorithm sandblaster holds the training")


def test_sandblaster_with_zero_steps_says_why_it_stopped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["xor", "--algorithm", "sandblaster", "--steps", "0", "--train-size", "100"]
    code, out, err = run(capsys, "train", *argv, "--seed", "0", "--no-run-dir", "--json")
    assert code == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["steps"] == 0 and s["stop"] == "steps"


def test_resuming_a_downpour_checkpoint_as_sandblaster_blames_the_algorithm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    code, out, err = run(capsys, "train", "xor", "--train-size", "200", "--replicas", "2",
                         "--epochs", "1", "--seed", "0", "--no-run-dir", "--checkpoint-dir",
                         str(ckpt), "--checkpoint-every", "50", "--json")  # fmt: skip
    assert code == 0, err
    code, out, err = run(capsys, "train", "--resume", str(ckpt), "--algorithm", "sandblaster",
                         "--no-run-dir")  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("distbelief: error: algorithm: "), lines[0]
    assert "is a checkpoint of a downpour run; resume it with --algorithm downpour" in lines[0]


def test_on_the_command_line_a_truncated_file_is_one_line_and_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((2000, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", (x[:, 0] > 0.5).astype(np.int64))
    show = distbelief.cli._LiveView.__call__

    def shrink_then_show(view: Any, report: Any) -> None:
        with open(tmp_path / "x.npy", "r+b") as f:
            f.truncate(4096)
        show(view, report)

    monkeypatch.setattr(distbelief.cli._LiveView, "__call__", shrink_then_show)
    code, out, err = run(capsys, "train", "--data", str(tmp_path / "x.npy"), "--epochs", "3",
                         "--replicas", "1", "--stages", "1", "--seed", "0", "--json",
                         "--run-dir", str(tmp_path / "run"))  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("distbelief: error: data: ") and "x.npy: the file shrank" in err
    assert json.loads(out.strip().splitlines()[-1])["exit_status"] == 1
    ends = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert ends[-1]["kind"] == "end" and ends[-1]["status"] == "failed"
