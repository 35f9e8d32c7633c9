"""One summary of a run for every algorithm: its settings (those declared ``shown``), what
its algorithm reports (the configuration's ``SUMMARY``) and what every run has, as a flat
JSON-serialisable dict and as tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .. import algorithms
from ..data import inputs as datasets
from ..results import TrainResult
from ..settings import declared


def algorithm_of(config: Any) -> str:
    """The registered name of the algorithm whose configuration this is."""
    return next(a for a in algorithms.names() if algorithms.get(a).config is type(config))


VIRTUAL = (
    "virtual_s", "virtual_examples_per_s", "virtual_eval_s", "machine_utilisation",
    "link_utilisation", "shard_utilisation", "bottleneck",
)  # fmt: skip
"""The simulated runtime's results in virtual time, reported beside the real ones."""


def summary(
    dataset: str,
    result: TrainResult,
    hidden: Sequence[int],
    wall_s: float,
    data_s: float,
    test: datasets.Data | None = None,
    truth_table: bool = False,
) -> dict[str, Any]:
    """The run's outcome as one flat, JSON-serialisable dict (``truth_table``: with the
    model's output on every test input, if the algorithm shows one)."""
    config = result.config
    name = algorithm_of(config)
    stats = result.stats
    evals = result.history.eval
    out: dict[str, Any] = {"dataset": dataset}
    if name != algorithms.names()[0]:
        out["algorithm"] = name
    out["hidden"] = list(hidden)
    out["model"] = None  # the --model spec, if one was given (the train command fills it in)
    for key, s in declared(config).items():
        if s.shown:
            out[key if s.shown is True else str(s.shown)] = getattr(config, key)
    out.update(
        wall_s=round(wall_s, 3),  # the train() call: spawn, training, evaluation
        train_s=round(stats["train_s"], 3),  # first mini-batch to the last step done
        data_s=round(data_s, 3),
        examples_per_s=round(stats["examples_per_s"], 1),
        test_accuracy=result.history.accuracy,
        test_loss=evals[-1]["loss"] if evals else None,
    )
    for key, value in config.SUMMARY.report:
        out[key] = value(result)
    out.update({k: stats[k] for k in VIRTUAL if k in stats})  # --runtime simulated
    if truth_table and config.SUMMARY.truth_table and test is not None:
        out["truth_table"] = _truth_table(result, test)
    return out


def _truth_table(result: TrainResult, test: datasets.Data) -> list[dict[str, Any]]:
    """Each test input with its target and the trained model's output (XOR's table)."""
    x, y = test
    with torch.no_grad():
        out = result.model(x)
    return [
        {
            "input": [int(v) for v in x[i].tolist()],
            "target": float(y[i, 0]),
            "output": round(float(out[i, 0]), 4),
        }
        for i in range(len(x))
    ]


def _virtual(s: dict[str, Any]) -> str | None:
    """The simulated cluster's time, speed and busiest resource (``--runtime simulated``)."""
    if s.get("virtual_s") is None:
        return None
    rate = s.get("virtual_examples_per_s")
    neck = s["bottleneck"]
    return (
        f"{s['virtual_s']:.4g} s simulated"
        + (f", {rate:,.0f} examples/s" if rate else "")
        + f"; busiest: {neck['resource']} ({neck['busy']:.0%})"
    )


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def print_summary(console: Console, s: dict[str, Any]) -> None:
    """The summary as tables: the run, its evaluations and its truth table (if any)."""
    name = s.get("algorithm", algorithms.names()[0])
    shown = algorithms.get(name).config.SUMMARY
    title = f"distbelief train {s['dataset']}" + (
        f" --algorithm {name}" if "algorithm" in s else ""
    )
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        *shown.rows,
        ("test loss", lambda s: _fmt(s["test_loss"], ".4f")),
        ("test accuracy", lambda s: _fmt(s["test_accuracy"], ".3f")),
        ("task", lambda s: f"{s['task']}: {s['task_reason']}" if s.get("task_reason") else None),
        ("virtual time", _virtual),
        *shown.tail,
    ]
    for label, text in rows:
        value = text(s)
        if value is not None:
            table.add_row(label, value)
    console.print(table)
    if len(s.get("evaluations", [])) > 1:
        evals = Table(title="evaluations on the test set")
        for column in ("examples", "training s", "test loss", "test accuracy"):
            evals.add_column(column, justify="right")
        for e in s["evaluations"]:
            evals.add_row(
                f"{e['examples']:,}", f"{e['wall_s']:.2f}", _fmt(e.get("loss"), ".4f"),
                _fmt(e.get("accuracy"), ".3f"),
            )  # fmt: skip
        console.print(evals)
    if "truth_table" in s:
        truth = Table(title="XOR truth table")
        for column in ("A", "B", "target", "output"):
            truth.add_column(column, justify="right")
        for row in s["truth_table"]:
            a, b = row["input"]
            truth.add_row(str(a), str(b), f"{row['target']:g}", f"{row['output']:.3f}")
        console.print(truth)
