"""The ``experiment`` command: a thin wrapper over ``distbelief.experiments``."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from .app import UsageFailure, app, prose
from .app import opt as _opt


@app.command("experiment")
@prose
def experiment_command(
    name: Annotated[
        str | None,
        typer.Argument(help="The experiment (see --list).", metavar="NAME", show_default=False),
    ] = None,
    list_them: Annotated[
        bool, typer.Option("--list", help="List the experiments and exit.")
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="The small version (about 15 s; for tests).")
    ] = False,
    out: Annotated[
        str | None,
        _opt(
            "Write the runs, figures, results.json and experiment.html here (default: "
            "runs/experiment-NAME-DATE-TIME)."
        ),  # fmt: skip
    ] = None,
    runtime: Annotated[
        str | None, _opt("Runtime (default: the experiment's own; see --list).")
    ] = None,
    seeds: Annotated[int | None, _opt("How many seeds (default: the experiment's).")] = None,
    seed: Annotated[int, _opt("The first seed; the others follow it (default 0).")] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print results.json's verdicts as one JSON line.")
    ] = False,
    cluster: Annotated[
        str | None,
        _opt(
            "A cluster file (TOML) for an experiment that calibrates one (model-parallel): "
            "e.g. an earlier run's cluster.toml; the same file and seed give the same "
            "simulated numbers (default: calibrate this machine now)."
        ),  # fmt: skip
    ] = None,
) -> None:
    """Run one of the paper's findings as an experiment: its sweep, its figures, and a verdict
    table saying whether the finding holds here, by a rule fixed in the code.

    Writes one run directory per training run, PNG figures, results.json and
    experiment.html (self-contained) into --out."""
    from .. import experiments

    if list_them:
        table = Table("experiment", "section", "runtimes (default first)", "what")
        for row in experiments.listing():
            table.add_row(*row)
        Console().print(table)
        return
    if name is None:
        raise UsageFailure(f"experiment: name one of {', '.join(experiments.names())} (or --list)")
    console = Console(stderr=True)
    try:
        sizes = None
        if cluster is not None:
            if "cluster" not in experiments.get(name).full:
                raise ConfigError(f"--cluster: {name} runs on no calibrated cluster")
            from ..runtime.simulated import read_cluster

            read_cluster(cluster)  # a file that cannot be read or parsed: named, before any run
            sizes = {"cluster": cluster}
        results = experiments.run(
            name, quick=quick, out=out, runtime=runtime, seeds=seeds, seed=seed, sizes=sizes,
            log=None if as_json else lambda m: console.print(m, style="dim", highlight=False),
        )  # fmt: skip
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    if as_json:
        keep = ("experiment", "runtime", "quick", "seeds", "verdicts", "out", "elapsed_s")
        print(json.dumps({k: results[k] for k in keep}))
        return
    table = Table("claim", "measured", "verdict", title=f"{name} (section {results['section']})")
    for claim, measured, verdict in experiments.verdict_rows(results):
        table.add_row(claim, measured, verdict)
    Console().print(table)
    print(f"{results['out']}/experiment.html")
