"""What each plot of ``distbelief report`` draws (README, *Run directories and reports*), read
from the matplotlib axes as they are saved and checked against the runs' own records:
test accuracy and loss against wall time and examples seen (training loss dashed),
examples/s per replica, the staleness histogram, each shard's update rate; two runs overlaid
and labelled by the setting that differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support import mlp

import distbelief
from distbelief import report as report_module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small runs that differ only in their replica count (1 and 2), 2 shards each."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g)
    y = (x[:, 0] > 0).long()
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for replicas in (1, 2):
        d = root / f"r{replicas}"
        distbelief.train(
            mlp([10, 16, 2]), (x, y), eval_data=(x[:128], y[:128]), loss="cross_entropy",
            lr=0.1, batch_size=8, epochs=2, replicas=replicas, shards=2, eval_every=128,
            seed=0, run_dir=d,
        )  # fmt: skip
        dirs.append(d)
    return dirs


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def drawn(runs, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each figure's title, axis labels, lines and bars, by file name, as it is saved."""
    out: dict[str, dict[str, Any]] = {}
    save = report_module._save

    def capture(fig, ax, path, *rest):
        out[path.name] = {
            "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
            "ylim": ax.get_ylim(),
            "lines": [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()),
                       line.get_linestyle()) for line in ax.get_lines()],
            "bars": [(c.get_label(), [p.get_height() for p in c]) for c in ax.containers],
        }  # fmt: skip
        return save(fig, ax, path, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_module, "_save", capture)
        written = report_module.report(runs, tmp_path_factory.mktemp("report"))
    assert [p.name for p in written[:-1]] == list(out)  # every figure drawn was saved
    return out


LABELS = ["r1: replicas=1", "r2: replicas=2"]  # each run: its name, then what differs


@pytest.mark.parametrize(
    "name, metric, x, xlabel",
    [
        ("accuracy_vs_time.png", "accuracy", "wall_s", "training wall time (s)"),
        ("accuracy_vs_examples.png", "accuracy", "examples", "examples seen"),
        ("loss_vs_time.png", "loss", "wall_s", "training wall time (s)"),
        ("loss_vs_examples.png", "loss", "examples", "examples seen"),
    ],
)
def test_test_metrics_and_the_dashed_training_loss_against_time_and_examples(
    runs, drawn, name, metric, x, xlabel
):
    fig = drawn[name]
    assert (fig["xlabel"], fig["ylabel"]) == (xlabel, metric)
    # One legend entry per run (its test line); its training line is drawn unlabelled, dashed.
    lines = [(None if label.startswith("_") else label, xs, ys, style)
             for label, xs, ys, style in fig["lines"]]  # fmt: skip
    want = []
    for label, run in zip(LABELS, runs):
        evals = records(run, "eval")
        want.append((label, [e[x] for e in evals], [e[metric] for e in evals], "-"))
        if metric == "loss":
            train = records(run, "train")
            want.append((None, [t[x] for t in train], [t["loss"] for t in train], "--"))
    assert lines == want
    if metric == "accuracy":
        assert fig["ylim"] == (0, 1)


def integral(xs: list[float], rates: list[float]) -> float:
    """What a rate curve adds up to from time 0: the count it was drawn from."""
    total, last = 0.0, 0.0
    for t, r in zip(xs, rates):
        total, last = total + r * (t - last), t
    return total


def test_examples_per_second_per_replica(runs, drawn):
    """A line per replica of each run (one legend entry per run), whose rates add up, over
    time, to the examples that replica reports at the line's last point."""
    fig = drawn["examples_per_s_per_replica.png"]
    assert (fig["xlabel"], fig["ylabel"]) == ("training wall time (s)", "examples/s")
    lines = fig["lines"]
    assert [label for label, *_ in lines if not label.startswith("_")] == [
        f"{label} (each line a replica)" for label in LABELS
    ]
    expected = [(run, r) for run, n in zip(runs, (1, 2)) for r in range(n)]
    assert len(lines) == len(expected) == 3
    for (_, xs, ys, _), (run, replica) in zip(lines, expected):
        mine = {p["wall_s"]: p["examples"] for p in records(run, "replica")
                if p["replica"] == replica}  # fmt: skip
        assert len(xs) >= 2 and set(xs) <= set(mine) and xs == sorted(xs)
        assert integral(xs, ys) == pytest.approx(mine[xs[-1]], rel=1e-9)


def test_the_staleness_histogram_is_each_runs_final_one_as_fractions(runs, drawn):
    fig = drawn["staleness_histogram.png"]
    assert fig["xlabel"] == "staleness (updates not seen)"
    assert fig["ylabel"] == "fraction of updates"
    want = []
    for label, run in zip(LABELS, runs):
        (end,) = records(run, "end")
        hist = end["stats"]["staleness_histogram"]
        want.append((label, [c / sum(hist) for c in hist]))
    assert fig["bars"] == want
    assert len(want[1][1]) > 1  # two replicas: some updates were stale


def test_each_shards_update_rate(runs, drawn):
    """A line per shard of each run, a colour and one legend entry per run, a line style per
    shard (its key in the legend's extras); its rates add up to the updates the shard had
    applied at the line's last point."""
    fig = drawn["shard_update_rate.png"]
    assert (fig["xlabel"], fig["ylabel"]) == ("training wall time (s)", "updates/s")
    shown = [(None if label.startswith("_") else label, style) for label, _, _, style in
             fig["lines"]]  # fmt: skip
    assert shown == [(run if k == 0 else None, ("-", "--")[k]) for run in LABELS for k in (0, 1)]
    for (_, xs, ys, _), (run, k) in zip(fig["lines"], [(r, k) for r in runs for k in (0, 1)]):
        mine = {p["wall_s"]: p["updates_applied"] for p in records(run, "shard")
                if p["shard"] == k}  # fmt: skip
        assert len(xs) >= 2 and set(xs) <= set(mine)
        assert integral(xs, ys) == pytest.approx(mine[xs[-1]], rel=1e-9)
