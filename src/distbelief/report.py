"""``distbelief report``: plots of one or more run directories, and one HTML page with them.

Reads each run directory's ``metrics.jsonl`` (see ``runlog``) and draws, with matplotlib's Agg
backend (no display needed):

- test accuracy and loss against wall time and against examples seen,
- examples/s of each replica against wall time,
- the staleness histogram (updates applied at each staleness),
- each shard's update rate against wall time.

Several runs are overlaid, each labelled by its directory's name and at most
``LABEL_SETTINGS`` of the settings that differ between the runs and apply to it (``replicas=1``
vs ``replicas=8``; a Sandblaster run is not labelled with Downpour's ``lr``); every setting is
in the configuration table. Legends sit below the axes, never over the curves. The page
``report.html`` embeds the PNGs as base64, so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window (this may run on a headless server)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .errors import ConfigError  # noqa: E402
from .storage.runlog import METRICS, read_metrics

IGNORED_IN_LABELS = frozenset(
    {"timeout_s", "torch_threads", "checkpoint_dir", "checkpoint_every", "resume"}
)
"""Settings of how a run is kept and run, not of what it learns: never used to tell runs apart
in a label (the configuration table shows every setting)."""
LABEL_SETTINGS = 3
"""At most this many differing settings in a run's legend label; the rest are in the table."""

log = logging.getLogger(__name__)


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
    # The engine's settings and the command's (dataset, hidden...), the command's first; the
    # algorithm named even where only the engine's settings were recorded (the API).
    engine = start.get("engine", {})
    algorithm = "sandblaster" if "steps" in engine else "downpour"
    config = {"algorithm": algorithm, **engine, **start.get("config", {})}
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


def label_settings(run: Run, runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """``key=value`` for at most :data:`LABEL_SETTINGS` of ``keys`` (settings that differ
    between ``runs``) that apply to ``run`` (set in its configuration: Sandblaster has no
    ``lr``, Downpour no ``steps``), the rarest values first: among nine runs of ``lr=0.5``
    the one of ``shards=2`` is labelled ``shards=2`` before ``lr=0.5``."""
    ranked = []
    for order, key in enumerate(keys):
        value = run.config.get(key)
        if value is None:
            continue
        same = sum(_show(r.config.get(key)) == _show(value) for r in runs)
        if same < len(runs):
            ranked.append((same, order, f"{key}={_show(value)}"))
    return [text for _, _, text in sorted(ranked)[:LABEL_SETTINGS]]


def label_runs(runs: Sequence[Run]) -> list[str]:
    """A legend label per run: its directory's name, then a few of the settings that differ
    between the runs and apply to it, e.g. ``sgd1: lr=0.1, replicas=1, optimizer=sgd``; the
    name alone for one run or when nothing differs. Two runs of one directory name are told
    apart by their parent directory too."""
    keys = differing_keys([r.config for r in runs])
    if "seed" in keys and len(keys) > 1:
        keys.remove("seed")  # the seed differs too, but the other settings tell them apart
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
    labels = []
    for run, name in zip(runs, names):
        shown = label_settings(run, runs, keys) if len(runs) > 1 else []
        labels.append(f"{name}: {', '.join(shown)}" if shown else name)
    for run, label in zip(runs, labels):
        run.label = label
    return labels


def figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """A figure in the report's size and style, for any plot of runs (experiments too)."""
    # Constrained layout makes room for a legend outside the axes (tight_layout gave up on it);
    # 864 x 518 pixels: sharp at half the width of a wide page, where report.html puts it.
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=144, layout="constrained")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, ax: Any, path: Path, extra: Sequence[Any] = ()) -> Path:
    """Save with the legend below the axes (it never covers a curve, whatever the labels'
    length); the figure grows to hold it. ``extra``: legend entries after the runs'."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        handles, labels = [*handles, *extra], [*labels, *(h.get_label() for h in extra)]
        ncols = 2 if len(handles) > 4 else 1
        fig.set_figheight(3.6 + 0.2 * -(-len(handles) // ncols))
        legend = fig.legend(handles, labels, loc="outside lower center", fontsize="small",
                            ncols=ncols, frameon=False)  # fmt: skip
        # Long labels: widen the figure to the legend rather than clip it at the edges.
        width = legend.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
        if width + 0.2 > fig.get_figwidth():
            fig.set_figwidth(width + 0.2)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path)
    plt.close(fig)
    return path


def _points(records: list[dict[str, Any]], x: str, y: str) -> tuple[list, list]:
    pts = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


RATE_POINTS = 40
"""Rates are drawn over intervals of at least 1/RATE_POINTS of the run: two reports a few
microseconds apart would otherwise show a spike of thousands per second."""


def time_key(run: Run) -> str:
    """The run's time axis: ``virtual_s`` for a run on the simulated runtime (its records
    carry the modelled cluster's seconds), else ``wall_s``."""
    records = run.train or run.eval
    return "virtual_s" if records and all("virtual_s" in r for r in records) else "wall_s"


def time_label(runs: Sequence[Run]) -> str:
    """The time axis' label: virtual time if every run is simulated, both if some are."""
    keys = {time_key(r) for r in runs}
    if keys == {"virtual_s"}:
        return "virtual time of the modelled cluster (s)"
    if keys == {"wall_s", "virtual_s"}:
        return "time (s): virtual for simulated runs, else training wall time"
    return "training wall time (s)"


def _rates(
    records: list[dict[str, Any]], counter: str, key: str = "wall_s"
) -> tuple[list[float], list[float]]:
    """``(time, rate)`` points of a cumulative ``counter``, each rate over an interval of at
    least 1/RATE_POINTS of the records' time span (from the run's start); time is ``key``."""
    pts = [(r[key], r[counter]) for r in records if r.get(counter) is not None and key in r]
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
    xlabel = time_label(runs) if x == "wall_s" else "examples seen"
    title = f"{'accuracy' if metric == 'accuracy' else 'loss'} vs "
    title += "time" if x == "wall_s" else "examples seen"
    fig, ax = figure(title, xlabel, metric)
    styles = []
    for i, run in enumerate(runs):
        color = _color(i)
        label: str | None = run.label  # one legend entry per run, its colour
        key = time_key(run) if x == "wall_s" else x
        xs, ys = _points(run.eval, key, metric)
        if xs:
            ax.plot(xs, ys, "o-", color=color, label=label)
            label = None
        if metric == "loss":
            xs, ys = _points(run.train, key, "loss")
            if xs:
                ax.plot(xs, ys, "--", color=color, alpha=0.6, label=label)
                styles = [
                    Line2D([], [], color="0.3", marker="o", label="test"),
                    Line2D([], [], color="0.3", linestyle="--", label="training"),
                ]
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    name = f"{metric}_vs_{'time' if x == 'wall_s' else 'examples'}.png"
    return _save(fig, ax, out / name, styles)


def _color(i: int) -> Any:
    """Run ``i``'s colour: tab10 for up to ten runs, then tab20's lighter shades."""
    return f"C{i}" if i < 10 else plt.get_cmap("tab20")((2 * i + 1) % 20)


def _plot_replicas(runs: Sequence[Run], out: Path) -> Path:
    fig, ax = figure("examples/s per replica", time_label(runs), "examples/s")
    many = len(runs) > 1
    for i, run in enumerate(runs):
        replicas = sorted({r["replica"] for r in run.replica})
        for j, replica in enumerate(replicas):
            mine = [r for r in run.replica if r["replica"] == replica]
            xs, ys = _rates(mine, "examples", time_key(run))
            # one colour per run when overlaying runs, one per replica otherwise
            color = _color(i) if many else f"C{j % 10}"
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
    fig, ax = figure("staleness of applied updates", "staleness (updates not seen)",
                      "fraction of updates")  # fmt: skip
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        hist = staleness_histogram(run)
        n = sum(hist)
        if n:
            xs = [s + (i - (len(runs) - 1) / 2) * width for s in range(len(hist))]
            ax.bar(xs, [c / n for c in hist], width=width, color=_color(i), label=run.label)
    return _save(fig, ax, out / "staleness_histogram.png")


def _plot_shards(runs: Sequence[Run], out: Path) -> Path:
    fig, ax = figure("updates applied per second, per shard", time_label(runs),
                      "updates/s")  # fmt: skip
    styles = ["-", "--", ":", "-."]
    many = len(runs) > 1
    shards: set[int] = set()
    for i, run in enumerate(runs):
        for j, k in enumerate(sorted({r["shard"] for r in run.shard})):
            shards.add(k)
            mine = [r for r in run.shard if r["shard"] == k]
            xs, ys = _rates(mine, "updates_applied", time_key(run))
            # overlaid runs: a colour and one legend entry per run, a line style per shard
            label = (run.label if j == 0 else None) if many else f"shard {k}"
            color = _color(i) if many else f"C{k % 10}"
            ax.plot(xs, ys, styles[k % len(styles)], color=color, label=label)
    extra = [
        Line2D([], [], color="0.3", linestyle=styles[k % len(styles)], label=f"shard {k}")
        for k in sorted(shards)
    ] if many and len(shards) > 1 else []  # fmt: skip
    return _save(fig, ax, out / "shard_update_rate.png", extra)


def last_known(run: Run) -> dict[str, Any]:
    """The run's final figures: the end record's, or for a run killed before it wrote one
    (or that failed), what its last progress reports said."""
    stats = dict((run.end or {}).get("stats") or {})
    if run.train:
        last = run.train[-1]
        stats.setdefault("examples", last.get("examples"))
        stats.setdefault("train_s", last.get("wall_s"))
        if stats["examples"] is not None and stats["train_s"]:
            stats.setdefault("examples_per_s", stats["examples"] / stats["train_s"])
    shards: dict[int, dict[str, Any]] = {r["shard"]: r for r in run.shard}
    if shards:
        applied = sum(r.get("updates_applied", 0) for r in shards.values())
        weighted = sum(r.get("staleness_mean", 0.0) * r.get("updates_applied", 0)
                       for r in shards.values())  # fmt: skip
        stats.setdefault("staleness_mean", weighted / applied if applied else None)
        stats.setdefault("staleness_max", max(r.get("staleness_max", 0) for r in shards.values()))
    return stats


def _status(run: Run) -> str:
    status = (run.end or {}).get("status", "unfinished")
    if (run.end or {}).get("stats") or not run.train:
        return status
    return f"{status} (figures of its last report, at {run.train[-1].get('wall_s', 0):.1f} s)"


def _summary_rows(runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    known = {id(r): last_known(r) for r in runs}

    def stat(run: Run, key: str, spec: str) -> str:
        v = known[id(run)].get(key)
        return "-" if v is None else format(v, spec)

    def final(run: Run, key: str) -> str:
        v = run.eval[-1].get(key) if run.eval else None
        return "-" if v is None else f"{v:.4f}"

    return [
        ("status", [_status(r) for r in runs]),
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

    def heading(run: Run) -> str:
        name, _, settings = run.label.partition(": ")
        return f"<th>{esc(name)}" + (f"<br><small>{esc(settings)}</small>" if settings else "")

    head = "".join(f"{heading(r)}</th>" for r in runs)

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
    dirs = "".join(f"<li>{esc(r.label)} <small>({esc(str(r.path))})</small></li>" for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>distbelief report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right;
          overflow-wrap: break-word; }}
tr > th:first-child {{ white-space: nowrap; }}
.wide {{ max-width: 100%; overflow-x: auto; }}
tr th:first-child {{ text-align: left; }}
tr.differs {{ background: #fff3c4; }}
.plots {{ display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 0.6em; }}
@media (max-width: 60em) {{ .plots {{ grid-template-columns: minmax(0, 1fr); }} }}
figure {{ margin: 0; }}
img {{ width: 100%; height: auto; border: 1px solid #eee; }}
</style></head><body>
<h1>distbelief report</h1>
<p>Runs{", each with a few of the settings that differ" if len(runs) > 1 else ""}:</p>
<ul>{dirs}</ul>{"<p>Highlighted below: every setting that differs.</p>" if len(runs) > 1 else ""}
<h2>Results</h2><div class="wide"><table><tr><th></th>{head}</tr>{summary}</table></div>
<h2>Plots</h2><div class="plots">{figures}</div>
<h2>Configuration</h2><div class="wide"><table><tr><th></th>{head}</tr>{config}</table></div>
</body></html>
"""


def report(
    run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None
) -> list[Path]:
    """Write the PNGs and ``report.html`` for ``run_dirs`` into ``out`` (default: the first
    run directory). Returns the files written, the HTML page last."""
    if not run_dirs:
        raise ConfigError("run_dirs: give at least one run directory")
    runs: list[Run] = []
    seen: dict[Path, str] = {}
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            log.warning("%s is the same run as %s: drawn once", d, seen[key])
            continue
        seen[key] = str(d)
        runs.append(load_run(d))
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
