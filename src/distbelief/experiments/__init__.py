"""``distbelief experiment``: the paper's findings, one reproducible command each.

Each experiment (one module here, one entry in :data:`REGISTRY`) declares its sweep (quick and
full sizes, as data), the runtimes it accepts and its default, the paper's statement quoted with
its section, and its verdict rule: a pure function of the measured numbers, fixed in the code
before any run, answering **holds**, **does not hold** or **inconclusive** with the numbers that
decide it. :func:`run` checks every input before any run starts, then writes into ``out``:

- ``runs/<name>/``: one run directory per training run (``metrics.jsonl``, ``config.toml``;
  ``distbelief report`` draws them),
- the figures, PNG,
- ``results.json``: the sizes, seeds, every run's numbers, the measured results, the verdicts,
- ``experiment.html``: one self-contained page (figures embedded) with the verdict table.

Learning rates picked "at their best" are picked on a validation split of the training data
(:func:`base.validation_split`), never on the test set.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..storage.runlog import default_run_dir, plain, prepare_dir
from . import (
    adagrad_replicas,
    downpour_vs_sandblaster,
    fetch_push,
    model_parallel,
    stragglers,
    warmstart,
)
from .base import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    Context,
    Experiment,
    Log,
    Verdict,
    validation_split,
)
from .page import render

__all__ = [
    "DOES_NOT_HOLD", "HOLDS", "INCONCLUSIVE", "REGISTRY", "Experiment", "Verdict", "get",
    "names", "prepare_out", "run", "validation_split",
]  # fmt: skip

RESULTS = "results.json"
PAGE = "experiment.html"

REGISTRY: tuple[Experiment, ...] = (
    adagrad_replicas.EXPERIMENT,
    warmstart.EXPERIMENT,
    fetch_push.EXPERIMENT,
    stragglers.EXPERIMENT,
    model_parallel.EXPERIMENT,
    downpour_vs_sandblaster.EXPERIMENT,
)
"""Every experiment, in the order ``--list`` shows them: the only list of them."""
assert len({e.name for e in REGISTRY}) == len(REGISTRY)


def names() -> list[str]:
    """Every experiment's name."""
    return [e.name for e in REGISTRY]


def get(name: str) -> Experiment:
    """The experiment called ``name``; ``ConfigError`` listing the known ones otherwise."""
    for experiment in REGISTRY:
        if experiment.name == name:
            return experiment
    raise ConfigError(f"experiment: unknown experiment {name!r}; choose from {', '.join(names())}")


def prepare_out(out: str | os.PathLike, name: str = "out") -> Path:
    """Create ``out`` and prove it writable, before any run starts; ``ConfigError`` naming it
    when a file is in the way, it cannot be created or written, or it already holds an
    experiment."""
    return prepare_dir(out, name, marker=RESULTS, holds="an experiment")


def check(
    name: str, runtime: str | None = None, seeds: int | None = None, seed: int = 0
) -> tuple[Experiment, str]:
    """The experiment and runtime of a request, every input checked (``ConfigError`` naming
    the bad one)."""
    experiment = get(name)
    chosen = runtime or experiment.default_runtime
    if chosen not in experiment.runtimes:
        raise ConfigError(
            f"runtime: {name} does not accept runtime {chosen!r}; it accepts "
            f"{', '.join(experiment.runtimes)}"
        )
    if seeds is not None and (not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f"seeds: must be an integer >= 1, got {seeds!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: must be an integer >= 0, got {seed!r}")
    return experiment, chosen


def run(
    name: str,
    *,
    quick: bool = False,
    out: str | os.PathLike | None = None,
    runtime: str | None = None,
    seeds: int | None = None,
    seed: int = 0,
    log: Log | None = None,
    sizes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run experiment ``name`` and write its files into ``out`` (default:
    ``runs/experiment-<name>-<date>-<time>``); returns the content of ``results.json``.
    ``seeds``: how many seeds (default: the sizes' ``seeds``), ``seed`` the first (seeds
    ``seed``, ``seed + 1``, ...). ``sizes``: entries replacing the quick or full sizes (for
    tests and studies of a variation). Every input is checked before any run starts."""
    experiment, chosen = check(name, runtime, seeds, seed)
    table = dict(experiment.quick if quick else experiment.full)
    unknown = sorted(set(sizes or {}) - set(table))
    if unknown:
        raise ConfigError(f"sizes: unknown for {name}: {', '.join(unknown)}")
    table.update(sizes or {})
    target = prepare_out(out if out is not None else default_run_dir(f"experiment-{name}"))
    count = seeds if seeds is not None else int(table.get("seeds", 1))
    table["seeds"] = count
    ctx = Context(target, chosen, table, range(seed, seed + count), quick, log)
    load = _load()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices; on a shared machine more threads only spin
    start = time.perf_counter()
    try:
        assert experiment.measure and experiment.judge and experiment.draw
        measured = experiment.measure(ctx)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    verdicts = experiment.judge(measured)
    images = experiment.draw(measured, target)
    results = {
        "experiment": experiment.name,
        "title": experiment.title,
        "section": experiment.section,
        "statement": experiment.statement,
        "runtime": chosen,
        "quick": quick,
        "seeds": ctx.seeds,
        "sizes": plain(table),
        "timed": experiment.timed,
        "reproducible": chosen in ("local", "simulated")
        and (not experiment.timed or chosen == "simulated")
        and bool(measured.get("reproducible", True)),  # False: rests on measured CPU time
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": elapsed,
        "load": f"load average {load} before, {_load()} after",
        "measured": plain(measured),
        "verdicts": [plain(v) for v in verdicts],
        "figures": [p.name for p in images],
        "runs": [o.row() for o in ctx.outcomes],
    }
    (target / RESULTS).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (target / PAGE).write_text(render(results, verdicts, images), encoding="utf-8")
    results["out"] = str(target)
    return results


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "unknown"


def listing() -> list[tuple[str, str, str, str]]:
    """``--list``'s rows: name, section, runtimes (default first), and what it shows."""
    return [
        (
            e.name,
            e.section,
            ", ".join(e.runtimes),
            e.title,
        )
        for e in REGISTRY
    ]


def verdict_rows(results: dict[str, Any]) -> Sequence[tuple[str, str, str]]:
    """(claim, measured, verdict) of a ``results.json``."""
    return [(v["claim"], v["measured"], v["verdict"]) for v in results["verdicts"]]
