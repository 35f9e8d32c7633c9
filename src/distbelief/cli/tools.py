"""The ``bench`` and ``report`` commands: thin wrappers over ``distbelief.bench`` and
``distbelief.report``."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from ..bench.registry import only_help
from ..errors import ConfigError
from .app import UsageFailure, app, prose
from .app import opt as _opt


@app.command("bench")
@prose
def bench_command(
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes (a smoke test).")] = False,
    only: Annotated[str | None, _opt(only_help())] = None,
    repeats: Annotated[int | None, _opt("Alternating repeats per comparison (best kept).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object, last line (not with --markdown).")
    ] = False,
    as_markdown: Annotated[
        bool,
        typer.Option(
            "--markdown", help="Print the table as Markdown, for the README (not with --json)."
        ),
    ] = False,
) -> None:
    """Measure the engine side by side against plain PyTorch baselines, in one run."""
    from .. import bench

    if as_json and as_markdown:
        raise UsageFailure("json: --json and --markdown each print the whole report; choose one")
    try:
        names = bench.parse_only(only)
        if repeats is not None and repeats < 1:
            raise ValueError(f"repeats: must be an integer >= 1, got {repeats}")
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    console = Console(stderr=True)
    report = bench.run(
        names,
        quick=quick,
        repeats=repeats,
        log=None if as_json else lambda m: console.print(m, style="dim"),
    )
    if as_json:
        print(json.dumps(report))
    elif as_markdown:
        print(bench.markdown(report))
    else:
        Console().print(bench.table(report))


@app.command("report")
@prose
def report_command(
    run_dirs: Annotated[
        list[str],
        typer.Argument(help="Run directories (of distbelief train).", metavar="RUN_DIR"),
    ],
    out: Annotated[
        str | None, _opt("Write the plots and report.html here (default: the first RUN_DIR).")
    ] = None,
) -> None:
    """Plot one or more runs: their curves as PNGs and one self-contained HTML page.

    Draws accuracy and loss against time and examples, examples/s per replica, the staleness
    histogram and the shards' update rates. Several runs are overlaid, labelled by what
    differs in their configurations."""
    from .. import report

    try:
        files = report.report(run_dirs, out)
    except ConfigError as exc:
        raise UsageFailure(str(exc).replace("run_dir:", "run-dir:", 1)) from None
    for path in files:
        print(path)


@app.command("calibrate")
@prose
def calibrate_command(
    runtime: Annotated[
        str,
        _opt("The runtime the cluster file models: local, processes (the default) or ray."),
    ] = "processes",
    out: Annotated[str, _opt("Where to write the cluster file (default: cluster.toml).")] = (
        "cluster.toml"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="Few repeats (a smoke test).")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the measured figures as one JSON object.")
    ] = False,
) -> None:
    """Measure this machine (a core's FLOP/s on the MNIST-1D MLP's layers, a tensor copy's
    cost per element, the handlers' cost per message, each runtime's seconds per message and
    the loopback's bandwidth) and write a cluster file for `distbelief train --runtime
    simulated --cluster FILE`.

    A separate command, not a `bench` entry: it writes a file the simulator reads, where a
    benchmark compares distbelief with a baseline."""
    from ..bench import calibrate

    if runtime not in calibrate.RUNTIMES:
        raise UsageFailure(
            f"runtime: must be one of {', '.join(calibrate.RUNTIMES)}, got {runtime!r}"
        )
    console = Console(stderr=True)
    runtimes = ("local",) if runtime == "local" else ("local", runtime)
    figures = calibrate.measure(
        runtimes, quick=quick, log=None if as_json else lambda m: console.print(m, style="dim")
    )
    options = calibrate.cluster_for(runtime, figures)
    comment = f"distbelief calibrate --runtime {runtime}: this machine, measured\n" + "\n".join(
        f"{name}: {entry}" for name, entry in figures["runtimes"].items()
    )
    try:
        with open(out, "w") as f:
            f.write(calibrate.to_toml(options, comment))
    except OSError as exc:
        raise UsageFailure(f"out: cannot write {out!r}: {exc.strerror}") from None
    if as_json:
        print(json.dumps({**figures, "cluster": options, "out": out}))
    else:
        print(out)
