"""``distbelief report``: plots of one or more run directories, and one HTML page with them.

Reads each run directory's ``metrics.jsonl`` (see ``runlog``) and draws, with matplotlib's Agg
backend (no display needed):

- test accuracy and loss against wall time and against examples seen,
- examples/s of each replica against wall time,
- the staleness histogram (updates applied at each staleness),
- each shard's update rate against wall time.

Several runs are overlaid, each labelled by what differs in their resolved configurations
(``replicas=1`` vs ``replicas=8``, ``optimizer=sgd`` vs ``optimizer=adagrad``). The page
``report.html`` embeds the PNGs as base64, so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window (this may run on a headless server)
import matplotlib.pyplot as plt  # noqa: E402

from .errors import ConfigError  # noqa: E402
from .runlog import METRICS, read_metrics  # noqa: E402

IGNORED_IN_LABELS = frozenset({"timeout_s", "torch_threads", "checkpoint_dir", "resume"})
"""Settings that do not change what a run computes: never used to tell runs apart."""


@dataclass
class Run:
    """One run directory's records, sorted by kind."""

    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    replica: list[dict[str, Any]] = field(default_factory=list)
    shard: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    label: str = ""


def load_run(path: str | os.PathLike, name: str = "run_dir") -> Run:
    """Read one run directory; ``ConfigError`` naming it if it holds no run."""
    p = Path(path)
    if not (p / METRICS).is_file():
        raise ConfigError(f"{name}: {str(p)!r} holds no run ({METRICS} not found)")
    try:
        records = read_metrics(p)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {str(p / METRICS)!r}: {exc}") from None
    start = next((r for r in records if r.get("kind") == "start"), None)
    if start is None:
        raise ConfigError(f"{name}: {str(p / METRICS)!r} has no start record")
    # The engine's settings and the command's (dataset, hidden...), the command's first.
    config = {**start.get("engine", {}), **start.get("config", {})}
    run = Run(p, config)
    for r in records:
        kind = r.get("kind")
        if kind in ("train", "replica", "shard", "eval"):
            getattr(run, kind).append(r)
        elif kind == "end":
            run.end = r
    return run


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={_show(v)}" for k, v in value.items()) or "{}"
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    return str(value)


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose values are not the same in every configuration (the seed last: a different
    seed alone is worth naming only when nothing else differs)."""
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys and k not in IGNORED_IN_LABELS]
    differ = [k for k in keys if len({_show(c.get(k)) for c in configs}) > 1]
    return [k for k in differ if k != "seed"] + [k for k in differ if k == "seed"]


def label_runs(runs: Sequence[Run]) -> list[str]:
    """A legend label per run: what differs between the configurations, e.g.
    ``replicas=1, optimizer=sgd``; the directory name when nothing does (or for one run)."""
    keys = differing_keys([r.config for r in runs])
    if "seed" in keys and len(keys) > 1:
        keys.remove("seed")  # the seed differs too, but the other settings tell them apart
    labels = [", ".join(f"{k}={_show(r.config.get(k, '-'))}" for k in keys) for r in runs]
    if len(runs) == 1 or not keys or len(set(labels)) < len(labels):
        labels = [r.path.name for r in runs]
    for run, label in zip(runs, labels):
        run.label = label
    return labels


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=96)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, ax: Any, path: Path) -> Path:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _points(records: list[dict[str, Any]], x: str, y: str) -> tuple[list, list]:
    pts = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


RATE_POINTS = 40
"""Rates are drawn over intervals of at least 1/RATE_POINTS of the run: two reports a few
microseconds apart would otherwise show a spike of thousands per second."""


def _rates(records: list[dict[str, Any]], counter: str) -> tuple[list[float], list[float]]:
    """``(wall_s, rate)`` points of a cumulative ``counter``, each rate over an interval of at
    least 1/RATE_POINTS of the records' time span (from the run's start)."""
    pts = [(r["wall_s"], r[counter]) for r in records if r.get(counter) is not None]
    if not pts:
        return [], []
    step = pts[-1][0] / RATE_POINTS
    xs, ys = [], []
    last_t, last_n = 0.0, 0
    for t, n in pts:
        if t - last_t >= step and t > last_t:
            xs.append(t)
            ys.append((n - last_n) / (t - last_t))
            last_t, last_n = t, n
    return xs, ys


def _plot_metric(runs: Sequence[Run], out: Path, metric: str, x: str) -> Path:
    """Test ``metric`` (and for loss, the training loss dashed) against ``x``."""
    xlabel = "training wall time (s)" if x == "wall_s" else "examples seen"
    title = f"{'accuracy' if metric == 'accuracy' else 'loss'} vs {xlabel.split(' (')[0]}"
    fig, ax = _figure(title, xlabel, metric)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        xs, ys = _points(run.eval, x, metric)
        if xs:
            ax.plot(xs, ys, "o-", color=color, label=f"{run.label} (test)")
        if metric == "loss":
            xs, ys = _points(run.train, x, "loss")
            if xs:
                ax.plot(xs, ys, "--", color=color, alpha=0.6, label=f"{run.label} (training)")
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    return _save(fig, ax, out / f"{metric}_vs_{'time' if x == 'wall_s' else 'examples'}.png")


def _plot_replicas(runs: Sequence[Run], out: Path) -> Path:
    fig, ax = _figure("examples/s per replica", "training wall time (s)", "examples/s")
    many = len(runs) > 1
    for i, run in enumerate(runs):
        replicas = sorted({r["replica"] for r in run.replica})
        for j, replica in enumerate(replicas):
            xs, ys = _rates([r for r in run.replica if r["replica"] == replica], "examples")
            # one colour per run when overlaying runs, one per replica otherwise
            color = f"C{(i if many else j) % 10}"
            if not many:
                label = f"replica {replica}"
            else:  # one legend entry per run
                label = f"{run.label} (each line a replica)" if j == 0 else None
            ax.plot(xs, ys, "-", color=color, alpha=0.7, linewidth=1, label=label)
    return _save(fig, ax, out / "examples_per_s_per_replica.png")


def staleness_histogram(run: Run) -> list[int]:
    """The run's final staleness histogram (summed over shards)."""
    if run.end and run.end.get("stats", {}).get("staleness_histogram"):
        return list(run.end["stats"]["staleness_histogram"])
    last: dict[int, list[int]] = {}
    for r in run.shard:
        last[r["shard"]] = r.get("staleness_histogram", [])
    total: list[int] = []
    for h in last.values():
        total += [0] * (len(h) - len(total))
        for i, c in enumerate(h):
            total[i] += c
    return total


def _plot_staleness(runs: Sequence[Run], out: Path) -> Path:
    fig, ax = _figure("staleness of applied updates", "staleness (updates not seen)",
                      "fraction of updates")  # fmt: skip
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        hist = staleness_histogram(run)
        n = sum(hist)
        if n:
            xs = [s + (i - (len(runs) - 1) / 2) * width for s in range(len(hist))]
            ax.bar(xs, [c / n for c in hist], width=width, color=f"C{i % 10}", label=run.label)
    return _save(fig, ax, out / "staleness_histogram.png")


def _plot_shards(runs: Sequence[Run], out: Path) -> Path:
    fig, ax = _figure("updates applied per second, per shard", "training wall time (s)",
                      "updates/s")  # fmt: skip
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        for k in sorted({r["shard"] for r in run.shard}):
            xs, ys = _rates([r for r in run.shard if r["shard"] == k], "updates_applied")
            label = f"{run.label}: shard {k}" if len(runs) > 1 else f"shard {k}"
            color = f"C{(i if len(runs) > 1 else k) % 10}"
            ax.plot(xs, ys, styles[k % len(styles)], color=color, label=label)
    return _save(fig, ax, out / "shard_update_rate.png")


def _summary_rows(runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    def stat(run: Run, key: str, spec: str) -> str:
        v = (run.end or {}).get("stats", {}).get(key)
        return "-" if v is None else format(v, spec)

    def final(run: Run, key: str) -> str:
        v = run.eval[-1].get(key) if run.eval else None
        return "-" if v is None else f"{v:.4f}"

    return [
        ("status", [(r.end or {}).get("status", "unfinished") for r in runs]),
        ("test accuracy", [final(r, "accuracy") for r in runs]),
        ("test loss", [final(r, "loss") for r in runs]),
        ("examples", [stat(r, "examples", ",") for r in runs]),
        ("training s", [stat(r, "train_s", ".2f") for r in runs]),
        ("examples/s", [stat(r, "examples_per_s", ",.0f") for r in runs]),
        ("staleness mean", [stat(r, "staleness_mean", ".2f") for r in runs]),
        ("staleness max", [stat(r, "staleness_max", "") for r in runs]),
    ]


def _html(runs: Sequence[Run], images: Sequence[Path]) -> str:
    keys = differing_keys([r.config for r in runs])
    all_keys: list[str] = []
    for r in runs:
        all_keys += [k for k in r.config if k not in all_keys]
    esc = html.escape
    head = "".join(f"<th>{esc(r.label)}</th>" for r in runs)

    def row(name: str, cells: list[str], mark: bool = False) -> str:
        cls = ' class="differs"' if mark else ""
        return f"<tr{cls}><th>{esc(name)}</th>" + "".join(
            f"<td>{esc(c)}</td>" for c in cells
        ) + "</tr>"  # fmt: skip

    summary = "".join(row(name, cells) for name, cells in _summary_rows(runs))
    config = "".join(
        row(k, [_show(r.config.get(k, "-")) for r in runs], k in keys and len(runs) > 1)
        for k in all_keys
    )
    figures = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"></figure>'
        for p in images
    )
    dirs = ", ".join(esc(str(r.path)) for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>distbelief report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
tr th:first-child {{ text-align: left; }}
tr.differs {{ background: #fff3c4; }}
figure {{ display: inline-block; margin: 0.3em; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
<h1>distbelief report</h1>
<p>Runs: {dirs}.{" Highlighted: the settings that differ." if len(runs) > 1 else ""}</p>
<h2>Results</h2><table><tr><th></th>{head}</tr>{summary}</table>
<h2>Plots</h2>{figures}
<h2>Configuration</h2><table><tr><th></th>{head}</tr>{config}</table>
</body></html>
"""


def report(
    run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None
) -> list[Path]:
    """Write the PNGs and ``report.html`` for ``run_dirs`` into ``out`` (default: the first
    run directory). Returns the files written, the HTML page last."""
    if not run_dirs:
        raise ConfigError("run_dirs: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    label_runs(runs)
    target = Path(out) if out is not None else runs[0].path
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out: cannot create {str(target)!r}: {exc.strerror or exc}") from None
    images = [
        _plot_metric(runs, target, "accuracy", "wall_s"),
        _plot_metric(runs, target, "accuracy", "examples"),
        _plot_metric(runs, target, "loss", "wall_s"),
        _plot_metric(runs, target, "loss", "examples"),
        _plot_replicas(runs, target),
        _plot_staleness(runs, target),
        _plot_shards(runs, target),
    ]
    page = target / "report.html"
    page.write_text(_html(runs, images), encoding="utf-8")
    return [*images, page]
