"""Periodic evaluation by default when a run directory is written: the report draws curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distbelief import report
from distbelief.cli import default_eval_every, main

pytestmark = pytest.mark.usefixtures("in_tmp_dir")


def test_default_is_one_epoch_within_10_to_50_evaluations() -> None:
    assert default_eval_every(8000, 15) == 8000  # the main job: every epoch
    assert default_eval_every(2000, 1) == 200  # one long epoch: ten times
    assert default_eval_every(100, 200) == 400  # many short ones: fifty times


def evaluations(capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    code = main(["train", "--train-size", "1000", "--seed", "0", "--json", *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_main_job_with_a_run_directory_reports_curves(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The main job's preset (15 epochs) on 1,000 examples: 14 evaluations during training,
    # one per epoch, and the final one; the report's accuracy plots draw all 15.
    s = evaluations(capsys, "--run-dir", "run")
    assert s["eval_every"] == 1000 and len(s["evaluations"]) == 15
    seen = [e["examples"] for e in s["evaluations"]]
    # each taken once its epoch is done (the shards' snapshot arrives a few steps later)
    assert all(1000 * k <= n < 1000 * (k + 1) for k, n in enumerate(seen[:-1], 1)), seen
    assert seen[-1] == 15_000
    assert "eval_every = 1000" in (tmp_path / "run" / "config.toml").read_text()
    assert main(["report", "run"]) == 0
    run = report.load_run(tmp_path / "run")
    assert len(run.eval) == 15 and len({e["wall_s"] for e in run.eval}) == 15
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'class="plots"' in page and "repeat(2," in page  # two plots a row on a wide page


@pytest.mark.slow  # (the fast tier stays under a minute)
@pytest.mark.parametrize("flags", [("--no-run-dir",), ("--run-dir", "run", "--eval-every", "0")])
def test_without_a_run_directory_or_with_eval_every_0_only_at_the_end(
    capsys: pytest.CaptureFixture[str], flags: tuple[str, ...]
) -> None:
    s = evaluations(capsys, "--epochs", "3", *flags)
    assert s["eval_every"] == 0 and len(s["evaluations"]) == 1
