"""The ``distbelief`` command: JSON output, human output, and one-line usage errors."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from typing import Any

import pytest
from support import run, run_json

from distbelief import ConfigError, cli

pytestmark = pytest.mark.usefixtures("in_tmp_dir")  # default run directories land there

FIELDS = (
    "dataset", "replicas", "stages", "shards", "n_fetch", "n_push", "optimizer", "examples",
    "wall_s", "examples_per_s", "test_accuracy", "final_loss", "updates_applied",
    "staleness_mean", "staleness_max", "rejected_pushes",
)  # fmt: skip


def check_plausible(s: dict[str, Any]) -> None:
    """Every required field is there and its value makes sense."""
    missing = [f for f in FIELDS if f not in s]
    assert not missing, missing
    assert s["examples"] > 0 and s["updates_applied"] > 0
    assert 0 < s["train_s"] <= s["wall_s"]
    assert s["examples_per_s"] == pytest.approx(s["examples"] / s["train_s"], rel=0.01)
    assert math.isfinite(s["final_loss"])
    assert 0.0 <= s["staleness_mean"] <= s["staleness_max"]
    assert s["rejected_pushes"] == 0
    assert sum(s["updates_applied_per_shard"]) == s["updates_applied"]
    assert len(s["updates_applied_per_shard"]) == s["shards"]


@pytest.mark.slow
def test_json_main_job_shape(capsys: pytest.CaptureFixture[str]) -> None:
    # The main job's preset on a slice of MNIST-1D for one epoch: the shape of the output.
    s = run_json(capsys, "train", "--train-size", "2000", "--epochs", "1")
    check_plausible(s)
    assert (s["dataset"], s["replicas"], s["stages"], s["shards"]) == ("mnist1d", 4, 2, 2)
    assert (s["optimizer"], s["n_fetch"], s["n_push"], s["hidden"]) == ("adagrad", 1, 1, [256, 256])
    assert s["examples"] == 2000
    # 4 replicas x 500 examples in batches of 32 = 4 x 16 steps; each step pushes to each
    # shard its stages overlap: (1 + 2 or 2 + 1) = 3 segments per step
    assert s["steps"] == 64 and s["updates_applied"] == 3 * 64
    assert s["shard_updates"] is None  # a processes runtime's option; this ran in-process


@pytest.mark.slow  # (the fast tier stays under a minute)
@pytest.mark.processes
def test_shard_updates_are_in_the_summary_and_the_json(capsys: pytest.CaptureFixture[str]) -> None:
    # issue 17: the JSON and the summary say how the shards applied pushes
    argv = ["train", "digits", "--epochs", "1", "--replicas", "2", "--stages", "1", "--shards",
            "1", "--hidden", "16", "--runtime", "processes", "--no-run-dir"]  # fmt: skip
    s = run_json(capsys, *argv, "--shard-updates", "hogwild")
    assert (s["runtime"], s["shard_updates"]) == ("processes", "hogwild")
    code, out, err = run(capsys, *argv, "--quiet")
    assert code == 0, err
    assert "2 x 1 (processes runtime, locked shard updates)" in out  # locked: the default


def test_json_flags_reach_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    s = run_json(
        capsys, "train", "digits", "--replicas", "3", "--stages", "3", "--shards", "4",
        "--n-fetch", "2", "--n-push", "3", "--batch-size", "16", "--epochs", "2", "--lr",
        "0.01", "--optimizer", "momentum", "--hidden", "32,16", "--seed", "7",
        "--warmstart-steps", "5",
    )  # fmt: skip
    check_plausible(s)
    expected = {
        "dataset": "digits", "replicas": 3, "stages": 3, "shards": 4, "n_fetch": 2,
        "n_push": 3, "batch_size": 16, "epochs": 2, "lr": 0.01, "optimizer": "momentum",
        "hidden": [32, 16], "seed": 7, "warmstart_steps": 5, "examples": 2 * 1438,
    }  # fmt: skip
    assert {k: s[k] for k in expected} == expected


@pytest.mark.slow  # (the fast tier stays under a minute)
def test_digits_preset_learns(capsys: pytest.CaptureFixture[str]) -> None:
    s = run_json(capsys, "train", "digits", "--seed", "0")
    check_plausible(s)
    assert s["test_accuracy"] >= 0.9  # 0.967-0.983 over seeds 0-4; chance is 0.1


@pytest.mark.slow  # (the fast tier stays under a minute)
def test_xor_truth_table_agrees_with_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    s = run_json(capsys, "train", "xor", "--train-size", "2000", "--replicas", "2", "--seed", "0")
    check_plausible(s)
    assert (s["optimizer"], s["lr"], s["batch_size"], s["stages"]) == ("sgd", 0.5, 1, 2)
    table = s["truth_table"]
    assert [row["input"] for row in table] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert [row["target"] for row in table] == [0.0, 1.0, 1.0, 0.0]
    assert all(0.0 < row["output"] < 1.0 for row in table)
    right = sum((row["output"] > 0.5) == (row["target"] > 0.5) for row in table)
    assert s["test_accuracy"] == right / 4


@pytest.mark.slow  # (the fast tier stays under a minute)
def test_human_output_has_progress_summary_and_truth_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "train", "xor", "--train-size", "1000", "--replicas", "2")
    assert code == 0, err
    assert "1,000/1,000 examples" in err  # the progress line saw the master's last report
    assert "test accuracy" in out and "staleness mean / max" in out
    assert "XOR truth table" in out and "target" in out
    assert not out.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--replicas", "-1"], "replicas"),
        (["--shards", "0"], "shards"),
        (["--batch-size", "-32"], "batch_size"),
        (["--epochs", "0"], "epochs"),
        (["--n-push", "0"], "n_push"),
        (["--optimizer", "rmsprop"], "optimizer"),
        (["--hidden", "256,abc"], "hidden"),
        (["--hidden", "256,-3"], "hidden"),
        (["--stages", "9"], "stages"),
        (["--lr", "0"], "lr"),
        (["--runtime", "slurm"], "runtime"),
        (["--address", "ray://x:1"], "address"),
        (["--replicas", "many"], "replicas"),
        (["--no-such-flag"], "no-such-flag"),
        (["--seed", "99999999999999999999999"], "seed"),
        (["--torch-threads", "100000"], "torch-threads"),
        (["--hidden", "100000,100000"], "hidden"),  # 37 GiB of float32 > 8 GiB: refused
        (["--lr", "1e300"], "lr"),
        (["--inject", "kill:shard0"], "inject"),
        (["--shard-updates", "hogwild"], "shard-updates: applies to --runtime processes"),
        (["--runtime", "processes", "--shard-updates", "racy"], "shard-updates: choose"),
        (["--inject", "kill:shard9@update=3"], "faults: kill:shard9@update=3 names no actor"),
        (["--inject", "kill:replica0.stage0@step=999999"], "step=999999 can never fire"),
        (["--inject", "delay:shard0=5"], "inject: 'delay:shard0=5' is not delay:ACTOR=DURATION"),
        (["--inject", "delay:replica9=5ms"], "faults: delay:replica9=5ms slows no actor"),
    ],
)
def test_invalid_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    names: str,
) -> None:
    monkeypatch.setattr(cli, "available_memory", lambda: 8 << 30)  # whatever this machine has
    code, out, err = run(capsys, "train", "digits", *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("distbelief: error:") and names in lines[0]
    assert "Traceback" not in err


def test_unknown_dataset_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "train", "cifar10")
    assert code == 2 and out == "" and err.startswith("distbelief: error: dataset: unknown")


def test_more_stages_than_layers_names_the_layers(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "digits", "--hidden", "", "--stages", "2")
    assert code == 2 and "stages" in err and "1 layers" in err


def test_bench_rejects_unknown_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "bench", "--only", "overhead,speed")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "only: unknown benchmark speed" in err


def test_console_script_is_installed_and_fails_cleanly() -> None:
    # The entry point [project.scripts] installs (wherever the installer put the script), and
    # the command as a process: python -m distbelief runs the same main.
    (script,) = entry_points(group="console_scripts", name="distbelief")
    assert script.value == "distbelief.cli:entry", "reinstall: pip install -e ."
    proc = subprocess.run(
        [sys.executable, "-m", "distbelief", "train", "--replicas", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "distbelief: error: replicas: must be an integer >= 1, got 0"
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        (["--runtime", "ray", "--address", "10.0.0.5:6379"], {"address": "10.0.0.5:6379"}),
        (["--runtime", "processes", "--shard-updates", "hogwild"], {"shard_updates": "hogwild"}),
    ],
)
def test_runtime_flags_reach_the_runtime(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    options: dict[str, str],
) -> None:
    seen: dict[str, Any] = {}

    def fake_train(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise ConfigError("runtime: stopped by the test")

    monkeypatch.setattr(cli, "train", fake_train)
    code, _, err = run(capsys, "train", "digits", *argv)
    assert code == 2 and "stopped by the test" in err
    assert seen["runtime"] == argv[1] and seen["runtime_options"] == options


def test_ctrl_c_during_a_run_exits_130_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_train = cli.train

    def train_then_ctrl_c(*args: Any, progress: Any, **kw: Any) -> Any:
        reports = []

        def hook(report: Any) -> None:
            progress(report)
            reports.append(report)
            if len(reports) == 2:
                signal.raise_signal(signal.SIGINT)  # in the driver's thread, as Ctrl-C is

        return real_train(*args, progress=hook, **kw)

    monkeypatch.setattr(cli, "train", train_then_ctrl_c)
    code, out, err = run(capsys, "train", "xor", "--train-size", "2000", "--replicas", "2")
    assert code == 130 and out == ""
    # The run directory has checkpoints on: the last one, written on the way out, is named.
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"distbelief: error: interrupted: checkpoint at step \d+ in (\S+/checkpoints); "
        r"resume with distbelief train --resume (\S+)",
        last,
    )
    assert match and match.group(1) == match.group(2), last


def test_an_injected_fault_is_survived_and_reported(capsys: pytest.CaptureFixture[str]) -> None:
    s = run_json(capsys, "train", "digits", "--epochs", "1", "--inject",
                 "kill:replica1.stage1@step=3")  # fmt: skip
    assert s["restarts"] == 1
    assert s["examples"] == 1438  # the lost step was redone, and counted once


SANDBLASTER_FIELDS = (
    "steps", "function_evals", "portions_done", "backup_portions", "duplicates_dropped",
    "coordinator_bytes", "test_accuracy", "final_loss",
)  # fmt: skip


@pytest.mark.slow
def test_sandblaster_mnist1d_preset_learns(capsys: pytest.CaptureFixture[str]) -> None:
    s = run_json(capsys, "train", "--algorithm", "sandblaster", "--seed", "0")  # 0.65 at seed 0
    missing = [f for f in SANDBLASTER_FIELDS if f not in s]
    assert not missing, missing
    assert (s["algorithm"], s["replicas"], s["shards"], s["hidden"]) == (
        "sandblaster",
        4,
        2,
        [256, 256],
    )
    assert s["test_accuracy"] >= 0.60
    assert 0 < s["steps"] <= 60 and s["function_evals"] >= s["steps"]
    assert len(s["portions_done"]) == 4 and sum(s["portions_done"]) == 32 * s["function_evals"]
    assert s["coordinator_bytes"] > 0


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["--history", "-1"], "history"),
        (["--portions", "2"], "portions"),
        (["--steps", "-2"], "steps"),
        (["--lr", "0.1"], "lr"),
        (["--epochs", "3"], "epochs"),
        (["--n-fetch", "2"], "n-fetch"),
        (["--optimizer", "adagrad"], "optimizer"),
        (["--warmstart-steps", "5"], "warmstart-steps"),
    ],
)
def test_bad_sandblaster_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], name: str
) -> None:
    code, out, err = run(capsys, "train", "digits", "--algorithm", "sandblaster", *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distbelief: error: {name}:"), err


def test_sandblaster_options_without_the_algorithm_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "train", "digits", "--steps", "5")
    assert code == 2 and err.strip() == (
        "distbelief: error: steps: a Sandblaster option; give --algorithm sandblaster"
    )
