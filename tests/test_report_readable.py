"""``distbelief report`` on ten runs of both algorithms (issue 20): legend labels short, each
naming the run and only settings that differ and apply to it; legends that fit; a killed run's
last known figures; the same run given twice drawn once, with a warning."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from support import mlp
from torch import nn

import distbelief
from distbelief import report
from distbelief.data.inputs import xor
from distbelief.storage.runlog import METRICS, RunLog

# Nine Downpour runs, each differing from the first in one setting, and one Sandblaster run.
DOWNPOUR = dict(lr=0.5, batch_size=2, epochs=1, replicas=1, shards=1, seed=0)
VARIANTS: list[dict[str, Any]] = [
    {}, {"lr": 0.1}, {"replicas": 2}, {"optimizer": "adagrad"}, {"batch_size": 4},
    {"epochs": 2}, {"shards": 2}, {"n_push": 2}, {"n_fetch": 2},
]  # fmt: skip


@pytest.fixture(scope="module")
def ten_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    train, test = xor(200, seed=0)
    paths = []
    for i, variant in enumerate(VARIANTS):
        path = root / f"r{i}"
        distbelief.train(mlp([2, 4, 1], nn.Sigmoid), train, eval_data=test, loss="mse",
                         run_dir=RunLog(path, tensorboard=False),
                         **{**DOWNPOUR, **variant})  # fmt: skip
        paths.append(path)
    path = root / "r9"
    distbelief.train(mlp([2, 4, 1], nn.Sigmoid), train, eval_data=test, loss="mse",
                     algorithm="sandblaster", steps=3, history=3, replicas=2, seed=0,
                     run_dir=RunLog(path, tensorboard=False))  # fmt: skip
    paths.append(path)
    # r2 was killed: its metrics stop at the last progress report (no end record).
    metrics = paths[2] / METRICS
    lines = metrics.read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["kind"] not in ("end",)]
    kept = [ln for ln in kept if not (json.loads(ln)["kind"] == "eval" and json.loads(ln)["final"])]
    metrics.write_text("\n".join(kept) + "\n")
    return paths


@pytest.mark.slow
def test_ten_runs_have_short_labels_naming_only_differing_settings_that_apply(
    ten_runs: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")  # matplotlib's "tight layout not applied" included
        files = report.report([*map(str, ten_runs), str(ten_runs[0])], tmp_path / "out")
    # The same run given twice is drawn once, with a warning naming it.
    assert [r.getMessage() for r in caplog.records] == [
        f"{ten_runs[0]} is the same run as {ten_runs[0]}: drawn once"
    ]
    runs = [report.load_run(p) for p in ten_runs]
    labels = report.label_runs(runs)
    differing = set(report.differing_keys([r.config for r in runs]))
    for run, label in zip(runs, labels):
        assert len(label) <= 50, label
        name, _, settings = label.partition(": ")
        assert name == run.path.name
        shown = dict(s.split("=", 1) for s in settings.split(", ")) if settings else {}
        assert len(shown) <= report.LABEL_SETTINGS, label
        for key, value in shown.items():
            assert key in differing and run.config.get(key) is not None, (label, key)
            assert value == report._show(run.config[key]), label
    # Each Downpour variant names the setting it changed; Sandblaster names no Downpour one.
    for variant, label in zip(VARIANTS[1:], labels[1:9]):
        ((key, value),) = variant.items()
        assert f"{key}={report._show(value)}" in label, label
    assert "algorithm=sandblaster" in labels[9] and "lr=" not in labels[9]
    assert not any("=-" in label or "=None" in label for label in labels)
    # Every label is in the page, the killed run's last known figures too.
    page = files[-1].read_text()
    killed = dict(report._summary_rows(runs))
    assert killed["status"][2].startswith("unfinished (figures of its last report")
    assert killed["examples"][2] not in ("-", "") and killed["examples/s"][2] != "-"
    assert int(killed["examples"][2].replace(",", "")) > 0
    assert "overflow-wrap: break-word" in page
    for label in labels:
        name, _, settings = label.partition(": ")
        assert f"<th>{name}" in page and settings in page


def test_the_legend_is_below_the_axes(ten_runs: list[Path], tmp_path: Path) -> None:
    # Drawn outside the axes: the legend's box does not overlap the plotting area.
    import matplotlib.pyplot as plt

    runs = [report.load_run(p) for p in ten_runs]
    report.label_runs(runs)
    saved: list[Any] = []
    real_close = plt.close

    def keep(fig: Any) -> None:
        saved.append(fig)

    plt.close = keep  # type: ignore[assignment]
    try:
        report._plot_metric(runs, tmp_path, "loss", "examples")
    finally:
        plt.close = real_close  # type: ignore[assignment]
    (fig,) = saved
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    axes_box = fig.axes[0].get_window_extent(renderer)
    legend_box = legend.get_window_extent(renderer)
    assert legend_box.y1 <= axes_box.y0 and not fig.axes[0].get_legend()
    assert legend_box.x0 >= 0 and legend_box.x1 <= fig.bbox.width  # not clipped at either edge
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == 10 + 2 and texts[-2:] == ["test", "training"]
    assert all(re.match(r"^r\d", t) for t in texts[:10])
    real_close(fig)
