"""Your own data: CSV, Parquet, .npz and .npy files, from the command and the API, read by
the data shards themselves; bad files refused before training with the file and where."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support import mlp, run

import distbelief
from distbelief import ConfigError, cli
from distbelief.data.inputs import TensorRows, files


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, "train", *argv, "--json", "--no-run-dir")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def write_csv(path: Path, header: list[str], rows: np.ndarray) -> Path:
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(repr(v) if isinstance(v, float) else str(v) for v in row) + "\n")
    return path


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """scikit-learn's digits as train/test files in every format; the label column first."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    order = np.random.default_rng(1).permutation(len(x))
    parts = {"train": order[360:], "test": order[:360]}
    root = tmp_path_factory.mktemp("digits")
    names = ["digit", *(f"px{i}" for i in range(64))]
    out: dict[str, list[Path]] = {k: [] for k in ("csv", "parquet", "npz", "npy")}
    for part, rows in parts.items():
        xs, ys = x[rows], y[rows]
        table = [[int(t), *(float(v) for v in r)] for r, t in zip(xs, ys)]
        out["csv"].append(write_csv(root / f"{part}.csv", names, table))
        columns = {"digit": ys, **{f"px{i}": xs[:, i] for i in range(64)}}
        pq.write_table(pa.table(columns), root / f"{part}.parquet", row_group_size=256)
        out["parquet"].append(root / f"{part}.parquet")
        np.savez(root / f"{part}.npz", x=xs, y=ys)
        out["npz"].append(root / f"{part}.npz")
        (root / part).mkdir()
        np.save(root / part / "x.npy", xs)
        np.save(root / part / "y.npy", ys)
        out["npy"].append(root / part / "x.npy")
    return {k: (v[0], v[1]) for k, v in out.items()}


@pytest.mark.slow
def test_digits_csv_trains_and_other_formats_give_the_same_run(
    capsys: pytest.CaptureFixture[str], digits_files: dict[str, tuple[Path, Path]]
) -> None:
    results = {}
    for fmt in ("csv", "parquet", "npz"):
        train, test = digits_files[fmt]
        target = ["--target", "digit"] if fmt != "npz" else []
        results[fmt] = run_json(
            capsys, "--data", str(train), *target, "--test-data", str(test), "--seed", "3"
        )
    s = results["csv"]
    assert s["task"] == "classify" and s["test_accuracy"] >= 0.90  # chance is 0.1
    assert (s["replicas"], s["stages"], s["optimizer"], s["hidden"]) == (
        4,
        2,
        "adagrad",
        [128, 128],
    )
    assert s["examples"] == 20 * 1437
    keys = ("test_accuracy", "test_loss", "final_loss", "examples", "updates_applied")
    for fmt in ("parquet", "npz"):
        assert {k: results[fmt][k] for k in keys} == {k: s[k] for k in keys}, fmt


@pytest.mark.parametrize("reading", ["per epoch", "per mini-batch"])
def test_a_file_run_equals_the_same_run_on_tensors(
    digits_files: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch, reading: str
) -> None:
    # The data shard reads its part of the file (a small part once an epoch, a large one a
    # mini-batch at a time) in the epoch's seeded order: the run is the in-memory run, bit
    # for bit.
    import distbelief.data.formats.filedata as datafiles  # where parts are read

    if reading == "per mini-batch":
        monkeypatch.setattr(datafiles, "IN_MEMORY_PART_BYTES", 0)
    train, test = digits_files["npy"]
    x, y = np.load(train), np.load(train.with_name("y.npy"))
    tx, ty = np.load(test), np.load(test.with_name("y.npy"))
    kw: dict[str, Any] = dict(
        loss="cross_entropy", lr=0.05, batch_size=32, epochs=2, replicas=3, stages=2,
        shards=2, optimizer="adagrad", seed=5,
    )  # fmt: skip
    on_file = distbelief.train(mlp([64, 32, 10]), str(train), eval_data=files(test), **kw)
    in_memory = distbelief.train(
        mlp([64, 32, 10]),
        (torch.from_numpy(x), torch.from_numpy(y)),
        eval_data=(torch.from_numpy(tx), torch.from_numpy(ty)),
        **kw,
    )
    for a, b in zip(on_file.model.parameters(), in_memory.model.parameters()):
        assert torch.equal(a, b)
    assert on_file.history.eval[-1]["accuracy"] == in_memory.history.eval[-1]["accuracy"]
    assert on_file.history.eval[-1]["loss"] == pytest.approx(in_memory.history.eval[-1]["loss"])


def test_regression_csv_reaches_the_noise_level(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2500, 8))
    noise = 0.1  # mse of the true function: 0.01
    y = x @ rng.normal(size=8) + 0.5 + rng.normal(0, noise, len(x))
    header = [*(f"f{i}" for i in range(8)), "value"]
    rows = np.column_stack([x, y]).round(6).tolist()
    write_csv(tmp_path / "train.csv", header, rows[:2000])
    write_csv(tmp_path / "test.csv", header, rows[2000:])
    s = run_json(
        capsys, "--data", str(tmp_path / "train.csv"), "--test-data", str(tmp_path / "test.csv"),
        "--epochs", "10", "--seed", "0",  # a fixed seed: the CLI draws one otherwise
    )  # fmt: skip
    assert s["task"] == "regress" and s["test_accuracy"] is None
    assert noise**2 * 0.7 < s["test_loss"] < noise**2 * 2.0  # a constant predictor: ~3.0


def test_test_split_and_task_and_train_size(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    digits_files: dict[str, tuple[Path, Path]],
) -> None:
    train, _ = digits_files["parquet"]
    given: dict[str, Any] = {}

    def spy(model: Any, train_data: Any, **kw: Any) -> Any:  # what the command trains on
        given.update(train=train_data, eval=kw["eval_data"])
        return distbelief.train(model, train_data, **kw)

    monkeypatch.setattr(cli, "train", spy)
    s = run_json(
        capsys, "--data", str(train), "--target", "digit", "--test-split", "0.25",
        "--task", "regress", "--train-size", "500", "--epochs", "1", "--replicas", "2",
    )  # fmt: skip
    assert s["task"] == "regress" and s["examples"] == 500 and s["test_loss"] is not None
    data = files(train, target="digit")
    a_train, a_test = data.split(0.25)

    # The run evaluated on the held-out quarter and trained on 500 rows of the other part.
    def file_rows(view: Any) -> list[int]:
        return view._file_rows(np.arange(len(view))).tolist()

    assert file_rows(given["eval"]) == file_rows(a_test)
    assert len(given["train"]) == 500 and set(file_rows(given["train"])) <= set(file_rows(a_train))
    b_train, b_test = data.split(0.25)
    assert len(a_test) == round(0.25 * len(data)) and len(a_train) + len(a_test) == len(data)
    assert np.array_equal(a_test.rows, b_test.rows)  # the same rows whatever the run's seed
    assert not set(a_train.rows.tolist()) & set(a_test.rows.tolist())


@pytest.mark.slow
def test_driver_memory_stays_far_below_a_large_npy_file(tmp_path: Path) -> None:
    # 1 epoch over every row of a ~310 MiB .npy in mini-batches of 4,096, in a fresh process:
    # its peak RSS grows by far less than the file (the checking pass reads chunks, the data
    # shards read their mini-batches' rows). A first short run on the same file takes torch's
    # one-time allocations (~100 MiB, whatever the data), then the peak is reset.
    rows, width = 820_000, 100
    x_path, y_path = tmp_path / "x.npy", tmp_path / "y.npy"
    rng = np.random.default_rng(0)
    with open(x_path, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows, width)}
        np.lib.format.write_array_header_1_0(f, header)
        for lo in range(0, rows, 50_000):
            f.write(rng.random((min(50_000, rows - lo), width), dtype=np.float32).tobytes())
    np.save(y_path, (np.arange(rows) % 3).astype(np.int64))
    file_bytes = x_path.stat().st_size
    script = textwrap.dedent(
        f"""
        import json, sys
        from distbelief.cli import main

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

        args = ["train", "--data", {str(x_path)!r}, "--epochs", "1", "--batch-size", "4096",
                "--hidden", "8", "--replicas", "2", "--stages", "1", "--shards", "1", "--json",
                "--no-run-dir"]
        assert main([*args, "--train-size", "16384"]) == 0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = status("VmRSS")
        code = main(args)
        print(json.dumps({{"code": code, "before": before, "peak": status("VmHWM")}}))
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
        )
    finally:
        x_path.unlink()
        y_path.unlink()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    run_summary, measured = json.loads(lines[-2]), json.loads(lines[-1])
    assert measured["code"] == 0 and run_summary["examples"] == rows
    growth = measured["peak"] - measured["before"]
    assert growth < file_bytes / 4, (growth >> 20, file_bytes >> 20)


# ------------------------------------------------------------------------- bad input


def bad_files(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after 'train', what the one error line must contain)."""

    def csv(name: str, text: str) -> str:
        (root / name).write_text(text)
        return str(root / name)

    np.save(root / "x.npy", np.array([[1.0, 2.0], [3.0, np.inf], [5.0, 6.0]]))
    np.save(root / "y.npy", np.array([0, 1, 0]))
    (root / "garbage.parquet").write_bytes(b"not parquet at all")
    ok = csv("ok.csv", "a,b,label\n1,2,0\n3,4,1\n")
    return {
        "missing file": (["--data", str(root / "nope.csv")], "nope.csv: no such file"),
        "unreadable file": (
            ["--data", str(root / "garbage.parquet")],
            "garbage.parquet: not a Parquet file",
        ),
        "not a number": (
            ["--data", csv("cell.csv", "a,b,label\n1,2,0\n3,4,1\n5,six,0\n")],
            "cell.csv line 4, column 'b': 'six' is not a number",
        ),
        "missing target": (
            ["--data", ok, "--target", "class"],
            "ok.csv: no column 'class'; the columns are 'a', 'b', 'label'",
        ),
        "nan in csv": (
            ["--data", csv("nan.csv", "a,b,label\n1,2,0\nnan,4,1\n")],
            "nan.csv line 3: NaN or Inf in column 'a'",
        ),
        "inf in npy": (["--data", str(root / "x.npy")], "x.npy row 1: NaN or Inf in feature 1"),
        "non-integer label": (
            ["--data", csv("frac.csv", "a,b,label\n1,2,0\n3,4,1.5\n"), "--task", "classify"],
            "frac.csv line 3: label is not an integer",
        ),
        "empty file": (["--data", csv("empty.csv", "")], "empty.csv: the file is empty"),
        "header only": (["--data", csv("head.csv", "a,b,label\n")], "head.csv: no examples"),
        "widths differ": (
            ["--data", ok, "--test-data", csv("narrow.csv", "a,label\n1,0\n")],
            "narrow.csv: no column 'b', which the training data",
        ),
    }


BAD_NAMES = [
    "missing file", "unreadable file", "not a number", "missing target", "nan in csv",
    "inf in npy", "non-integer label", "empty file", "header only", "widths differ",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_NAMES)
def test_bad_data_exits_2_with_one_line_naming_file_and_where(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    argv, expected = bad_files(tmp_path)[case]
    code, out, err = run(capsys, "train", *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("distbelief: error: ") and expected in lines[0], lines[0]


def test_the_api_names_the_parameter(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1,0\nx,1\n")
    with pytest.raises(ConfigError, match=r"^train_data: .*bad.csv line 3, column 'a'"):
        distbelief.train(mlp([1, 2]), str(bad), loss="cross_entropy", lr=0.1, batch_size=1,
                         epochs=1)  # fmt: skip
    with pytest.raises(ConfigError, match=r"^path: .*bad.csv line 3"):
        files(bad)
    good, narrow = tmp_path / "good.csv", tmp_path / "narrow.csv"
    good.write_text("a,b,label\n1,2,0\n3,4,1\n")
    narrow.write_text("a,label\n1,0\n2,1\n")
    with pytest.raises(ConfigError, match=r"^eval_data: .*narrow.csv: no column .b., which"):
        distbelief.train(mlp([2, 2]), good, eval_data=files(narrow), loss="cross_entropy",
                         lr=0.1, batch_size=1, epochs=1)  # fmt: skip


def test_in_memory_rows_are_the_old_data_shard_input() -> None:
    # TensorRows: one gather and one split per epoch, as the data shard did before files.
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    part = TensorRows(x, y).part(1, 4)
    batches = part.batches(torch.tensor([2, 0, 1]), 2)
    assert [b[1].tolist() for b in batches] == [[3, 1], [2]]


def test_every_reader_gives_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_files: dict[str, tuple[Path, Path]]
) -> None:
    # Positioned reads (.npy, np.savez), streamed parts kept in memory
    # or spilled to a temporary file (CSV, Parquet, np.savez_compressed): the same examples.
    import distbelief.data.formats.filedata as datafiles  # where parts are read

    train, _ = digits_files["npy"]
    x, y = np.load(train), np.load(train.with_name("y.npy"))
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    rows = np.array([7, 3, 1000, 3, 0, len(x) - 1])
    expected_x, expected_y = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])

    def read(path: Path, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        data = files(path, **kw)
        part = data.part(0, len(data))  # a fresh reader, as a data shard opens
        return part.read(rows)

    spill_dir = tmp_path / "spill"  # the temporary directory: what a spill leaves is ours
    spill_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(spill_dir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    sources = [(train, {}), (tmp_path / "packed.npz", {})]
    sources += [(digits_files[f][0], {"target": "digit"}) for f in ("csv", "parquet")]
    sources += [(digits_files["npz"][0], {})]
    for spill in (False, True):
        monkeypatch.setattr(datafiles, "IN_MEMORY_PART_BYTES", 0 if spill else 64 << 20)
        for path, kw in sources:
            got_x, got_y = read(path, **kw)
            assert torch.equal(got_x, expected_x) and torch.equal(got_y, expected_y), (path, spill)
    assert tempfile.gettempdir() == str(spill_dir)
    assert not list(spill_dir.iterdir())  # spills unlinked
    # A part of a Parquet file with row groups of 256 reads only the groups that hold it.
    part = files(digits_files["parquet"][0], target="digit").part(600, 900)
    got_x, got_y = part.read(np.array([0, 299, 57]))
    assert torch.equal(got_x, torch.from_numpy(x[[600, 899, 657]]))
    assert torch.equal(got_y, torch.from_numpy(y[[600, 899, 657]]))


def test_on_ray_each_data_shard_reads_the_file_itself(
    ray_session: None, tmp_path: Path, digits_files: dict[str, tuple[Path, Path]]
) -> None:
    # One replica, one stage, one shard: the same run on Ray (the data shard in its own
    # process, reading the CSV there) as in-process on tensors.
    train, test = digits_files["csv"]
    npy_train = digits_files["npy"][0]
    x, y = (
        torch.from_numpy(np.load(npy_train)),
        torch.from_numpy(np.load(npy_train.with_name("y.npy"))),
    )
    kw: dict[str, Any] = dict(loss="cross_entropy", lr=0.1, batch_size=64, epochs=1, seed=2)
    on_ray = distbelief.train(
        mlp([64, 16, 10]), files(train, target="digit"), runtime="ray",
        eval_data=files(test, target="digit"), **kw,
    )  # fmt: skip
    local = distbelief.train(mlp([64, 16, 10]), (x, y), **kw)
    for a, b in zip(on_ray.model.parameters(), local.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert on_ray.stats["pids"]["data0"] != os.getpid()
    assert on_ray.history.accuracy is not None
