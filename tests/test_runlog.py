"""Run directories (metrics.jsonl, config.toml, TensorBoard), ``distbelief report``, ``--config``
and what the command prints to a pipe."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from support import run

from distbelief import cli, report
from distbelief.cli import main
from distbelief.storage.runlog import read_metrics

# A short digits run with evaluations during training: 4 replicas x 2 stages over 2 shards.
SHORT = ["train", "digits", "--train-size", "640", "--epochs", "2", "--eval-every", "400"]


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two runs that differ in replicas, optimizer and lr; their JSON summaries. (About 5 s:
    the tests that use it are marked slow.)"""
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "adagrad4", root / "sgd1"
    out: dict[str, Any] = {"a": a, "b": b}
    for path, extra in ((a, []), (b, ["--replicas", "1", "--optimizer", "sgd", "--lr", "0.1"])):
        code = main([*SHORT, "--seed", "3", "--run-dir", str(path), "--json", *extra])
        assert code == 0
    return out


@pytest.mark.slow
def test_metrics_jsonl_holds_every_kind_of_record(runs: dict[str, Any]) -> None:
    lines = (runs["a"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "end" and records[-1]["status"] == "done"
    start = records[0]
    assert start["config"]["dataset"] == "digits" and start["config"]["seed"] == 3
    assert start["engine"]["replicas"] == 4 and start["engine"]["optimizer"] == "adagrad"
    assert start["wall_s"] == 0.0 and all(isinstance(r["wall_s"], float) for r in records)
    replica = [r for r in records if r["kind"] == "replica"]
    assert {r["replica"] for r in replica} == {0, 1, 2, 3}
    for r in replica:
        assert {"step", "examples", "loss", "examples_per_s"} <= r.keys() and r["examples"] > 0
    assert max(r["examples"] for r in replica if r["replica"] == 2) == 160 * 2  # its part x 2
    shard = [r for r in records if r["kind"] == "shard"]
    assert {r["shard"] for r in shard} == {0, 1}
    for r in shard:
        hist = r["staleness_histogram"]
        assert sum(hist) == r["updates_applied"] and len(hist) == r["staleness_max"] + 1
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["final"] for e in evals] == [False, False, False, True]  # 400, 800, 1200; end
    for e in evals:
        assert e["examples"] > 0 and e["loss"] > 0
    # It learned: 0.48 at seed 3 (deterministic here); 0.09 after the first 400 examples, and
    # chance is 0.10.
    assert evals[-1]["accuracy"] >= 0.4
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["examples"] == 1280 and all(r["loss"] > 0 for r in train)
    assert all(a["wall_s"] <= b["wall_s"] for a, b in zip(train, train[1:]))  # in time order
    stats = records[-1]["stats"]
    assert stats["examples"] == 1280 and sum(stats["staleness_histogram"]) == sum(
        stats["updates_applied"]
    )


@pytest.mark.slow
def test_tensorboard_reads_the_same_scalars(runs: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(runs["a"].glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(runs["a"]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/examples_per_s", "eval/loss", "eval/accuracy"}
    expected |= {f"replica{r}/examples_per_s" for r in range(4)}
    expected |= {f"shard{k}/updates_applied" for k in range(2)}
    assert expected <= tags
    steps = [e.step for e in acc.Scalars("eval/accuracy")]  # 3 during training, then final
    assert len(steps) == 4 and 400 <= steps[0] < 800 <= steps[1] < 1200 <= steps[2]
    assert steps[3] == 1280
    assert "staleness" in acc.Tags()["histograms"]


@pytest.mark.slow
def test_config_toml_round_trips(
    runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tomllib.loads((runs["b"] / "config.toml").read_text())
    assert first["replicas"] == 1 and first["seed"] == 3 and first["hidden"] == "128,128"
    again = tmp_path / "again"
    argv = ["train", "--config", str(runs["b"] / "config.toml"), "--run-dir", str(again)]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    assert tomllib.loads((again / "config.toml").read_text()) == first
    # the same configuration and seed on the in-process runtime: the same run, bit for bit
    before = [r for r in read_metrics(runs["b"]) if r["kind"] == "end"][0]["stats"]
    after = [r for r in read_metrics(again) if r["kind"] == "end"][0]["stats"]
    assert after["staleness_histogram"] == before["staleness_histogram"]
    assert last_json(out)["final_loss"] == pytest.approx(
        [r for r in read_metrics(runs["b"]) if r["kind"] == "train"][-1]["loss"], abs=0
    )


def test_flags_on_the_command_line_win_over_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_train(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise cli.ConfigError("runtime: stopped by the test")

    monkeypatch.setattr(cli, "train", fake_train)
    conf = tmp_path / "run.toml"
    conf.write_text(
        'dataset = "digits"\nreplicas = 3\nlr = 1\nbatch-size = 8\nno_run_dir = true\n'
        'inject = ["kill:replica1.stage0@step=5"]\n'  # a flag that takes several values
    )
    code, _, err = run(capsys, "train", "--config", str(conf), "--replicas", "2")
    assert code == 2 and "stopped by the test" in err
    assert (seen["replicas"], seen["lr"], seen["batch_size"]) == (2, 1.0, 8)
    assert seen["epochs"] == 20 and seen["run_dir"] is None  # digits' preset; no run dir
    assert len(seen["runtime_options"]["faults"]) == 1


@pytest.mark.parametrize(
    ("text", "key"),
    [("replicaz = 3\n", "replicaz"), ('epochs = "ten"\n', "epochs"), ("lr = true\n", "lr"),
     ("config = 'x.toml'\n", "config"), ('inject = "kill:replica0.stage0@step=1"\n', "inject")],
)  # fmt: skip
def test_unknown_key_or_wrong_type_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    conf = tmp_path / "run.toml"
    conf.write_text(text)
    code, out, err = run(capsys, "train", "digits", "--config", str(conf))
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("distbelief: error: config:") and repr(key) in line


def test_unwritable_run_dir_exits_2_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_train(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("trained despite an unusable run directory")

    monkeypatch.setattr(cli, "train", must_not_train)
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    held = tmp_path / "held"
    held.mkdir()
    (held / "metrics.jsonl").write_text("")
    if os.geteuid() == 0:  # root writes anywhere it may create: /sys refuses even root
        locked = Path("/sys/distbelief-test-run")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        locked = tmp_path / "locked" / "run"
    for path in (in_the_way, in_the_way / "sub", held, locked):
        code, out, err = run(capsys, "train", "digits", "--run-dir", str(path))
        assert code == 2 and out == ""
        (line,) = err.strip().splitlines()
        assert line.startswith("distbelief: error: run-dir:") and str(path) in line


def _pngs_ok(files: list[Path]) -> None:
    for f in files:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, f


@pytest.mark.slow
def test_report_of_one_run(runs: dict[str, Any], tmp_path: Path) -> None:
    files = report.report([runs["a"]], tmp_path / "one")
    *pngs, page = files
    assert len(pngs) == 7 and page.name == "report.html"
    _pngs_ok(pngs)
    text = page.read_text()
    embedded = text.split('src="data:image/png;base64,')[1:]
    assert len(embedded) == len(pngs)
    assert base64.b64decode(embedded[0].split('"')[0]) == pngs[0].read_bytes()
    # Opens offline: nothing outside the embedded images points elsewhere (base64 may hold
    # "http" by chance, so the images' data is left out of the check).
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "<img" in text and "file:" not in outside and "http" not in outside


@pytest.mark.slow
def test_report_of_two_runs_names_what_differs(
    runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "two"
    code, out, err = run(capsys, "report", str(runs["a"]), str(runs["b"]), "--out", str(out_dir))
    assert code == 0, err
    written = [Path(line) for line in out.split()]
    _pngs_ok([p for p in written if p.suffix == ".png"])
    a, b = report.load_run(runs["a"]), report.load_run(runs["b"])
    labels = report.label_runs([a, b])
    assert labels == [
        "adagrad4: lr=0.05, replicas=4, optimizer=adagrad",
        "sgd1: lr=0.1, replicas=1, optimizer=sgd",
    ]
    page = (out_dir / "report.html").read_text()
    assert all(label in page for label in labels)


def test_report_of_a_directory_without_a_run_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "report", str(tmp_path))
    assert code == 2 and "run-dir" in err and str(tmp_path) in err


def test_json_lists_every_evaluation_and_the_seed_drawn(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, *SHORT, "--no-run-dir", "--json")
    assert code == 0, err
    s = last_json(out)
    assert s["eval_every"] == 400 and s["run_dir"] is None
    seen = [e["examples"] for e in s["evaluations"]]  # 3 during training (past 400, 800,
    assert len(seen) == 4 and 400 <= seen[0] < 800 <= seen[1] < 1200 <= seen[2]  # 1200), final
    assert seen[3] == 1280
    assert s["evaluations"][-1]["accuracy"] == pytest.approx(s["test_accuracy"], abs=1e-4)
    # The seed drawn (as the API draws one) is the one the run used: given, it repeats it.
    code, out, err = run(capsys, *SHORT, "--no-run-dir", "--json", "--seed", str(s["seed"]))
    assert code == 0, err
    again = last_json(out)

    def figures(summary: dict[str, Any]) -> list[Any]:
        evaluations = [(e["loss"], e["accuracy"]) for e in summary["evaluations"]]
        return [summary["final_loss"], *evaluations]

    assert figures(again) == figures(s)


@pytest.mark.slow
def test_output_to_a_pipe_has_no_control_characters(in_tmp_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "distbelief", *SHORT, "--seed", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert not [c for c in stream if ord(c) < 32 and c != "\n"], stream[:300]
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("digits: seed 1, run directory runs/digits-")
    assert any("1,280/1,280 examples" in line and "test acc" in line for line in lines)
    assert sum(line.startswith("  replica 3:") for line in lines) >= 2  # each replica's line
    assert "test accuracy" in proc.stdout and "evaluations on the test set" in proc.stdout
    assert len(list((in_tmp_dir / "runs").iterdir())) == 1


def test_quiet_prints_only_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *SHORT, "--no-run-dir", "--quiet")
    assert code == 0 and err == "" and "test accuracy" in out


def test_help_shows_the_presets_and_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())
    for text in ("mnist1d 15, xor 1, digits 20", "mnist1d 0.05, xor 0.5, digits 0.05",
                 "mnist1d 32, xor 1, digits 32", "random seed", "'' for none", "--config",
                 "--run-dir", "--quiet"):  # fmt: skip
        assert text in flat, text


def test_bench_json_and_markdown_together_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "bench", "--json", "--markdown")
    assert code == 2 and out == "" and "--markdown" in err
