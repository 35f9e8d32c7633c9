"""The report as a table: one row per comparison, each benchmark's rows in registry order, as
a rich table (the terminal) or as Markdown (the README)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .common import Row
from .registry import REGISTRY

COLUMNS = ("benchmark", "configuration", "distbelief", "baseline", "ratio")
"""Columns of the results table; ratio = distbelief / baseline throughput (higher is better)."""


def rows(report: dict[str, Any]) -> list[Row]:
    """The report as table rows, one comparison per row (see ``COLUMNS``)."""
    out: list[Row] = []
    for benchmark in REGISTRY:
        figures = report.get(benchmark.name)
        if figures:
            out += benchmark.rows(figures)
    return out


def _title(report: dict[str, Any]) -> str:
    m = report["machine"]
    return f"{report['command']} ({m['cpus']} cpus, {m['cpu']}, torch {m['torch']})"


def table(report: dict[str, Any]) -> Table:
    """The report as one rich table."""
    t = Table(title=_title(report))
    for name in COLUMNS:
        t.add_column(name, justify="left" if name in ("benchmark", "configuration") else "right")
    for row in rows(report):
        t.add_row(*row)
    return t


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (for the README), titled with command and machine."""
    lines = [f"`{_title(report)}`", "", "| " + " | ".join(COLUMNS) + " |",
             "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    lines += ["| " + " | ".join(row) + " |" for row in rows(report)]
    return "\n".join(lines)
