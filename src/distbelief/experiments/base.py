"""What every experiment shares: its declaration (:class:`Experiment`), its verdicts
(:class:`Verdict`), the context its measurement runs in (:class:`Context`: one method trains one
run into its own run directory), the validation split that learning rates are picked on, and
the figure helpers.

An experiment is three functions over plain data: ``measure(ctx) -> results`` (runs the sweep),
``judge(results) -> [Verdict]`` (pure: the rule fixed in code, applied to the measured numbers
only) and ``draw(results, out) -> [png]`` (the figures).
"""

from __future__ import annotations

import math
import re
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..api import train  # noqa: E402
from ..data.inputs import mnist1d  # noqa: E402
from ..errors import TrainingDiverged  # noqa: E402
from ..report import figure  # noqa: E402,F401  (re-exported: the experiments draw with it)
from ..storage.runlog import RunLog, plain  # noqa: E402

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
INCONCLUSIVE = "inconclusive"
VERDICTS = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)

Log = Callable[[str], None]
Data = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Verdict:
    """One row of an experiment's verdict table."""

    claim: str
    """What of the paper's statement this row tests, in a few words."""
    measured: str
    """What was measured, one line with the deciding numbers in it."""
    rule: str
    """The rule, in words, exactly as the code applies it."""
    verdict: str
    """``holds``, ``does not hold`` or ``inconclusive``."""
    numbers: dict[str, Any] = field(default_factory=dict)
    """The numbers that decide it."""

    def __post_init__(self) -> None:
        assert self.verdict in VERDICTS, self.verdict


@dataclass(frozen=True)
class Experiment:
    """One finding of the paper as one command (see the package doc)."""

    name: str
    """What ``distbelief experiment NAME`` takes."""
    title: str
    """One line: what it shows."""
    section: str
    """The paper's section, e.g. ``"4.1"``."""
    statement: str
    """The paper's words, quoted."""
    runtimes: tuple[str, ...]
    """Runtimes it accepts, its default first."""
    quick: Mapping[str, Any]
    """Sizes of ``--quick`` (about 15 s; for tests)."""
    full: Mapping[str, Any]
    """Sizes of the full run (about 10 minutes on a 2-core machine)."""
    measure: Callable[[Context], dict[str, Any]] | None = None
    """Runs the sweep, returns the measured numbers (plain data)."""
    judge: Callable[[dict[str, Any]], list[Verdict]] | None = None
    """The verdict rule: a pure function of the measured numbers."""
    draw: Callable[[dict[str, Any], Path], list[Path]] | None = None
    """Writes the figures (PNG) into the directory; returns their paths."""
    timed: bool = False
    """Its verdict rests on time: real wall time (not reproducible) except on ``simulated``,
    where it is the modelled cluster's virtual time (reproducible from the seed)."""

    @property
    def default_runtime(self) -> str:
        """The runtime that makes its point."""
        return self.runtimes[0]


@dataclass
class Outcome:
    """What one training run of an experiment gave."""

    name: str
    """The run's directory name under ``<out>/runs``."""
    settings: dict[str, Any]
    diverged: bool
    val_accuracy: float | None = None
    """Final accuracy on the validation split (what learning rates are picked on)."""
    test_accuracy: float | None = None
    """Final accuracy on the test set (reported; never used to pick anything)."""
    stats: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)
    """Evaluations during training on the validation split: examples, wall_s, loss, accuracy."""
    losses: list[dict[str, float]] = field(default_factory=list)
    """Training loss points: examples, wall_s, loss."""
    diverged_at: int | None = None
    """A diverged run: the examples seen when it was found (from the reason), if said."""
    reason: str | None = None
    """A diverged run: what went wrong and when (``TrainingDiverged.reason``)."""

    def row(self) -> dict[str, Any]:
        """As plain data for ``results.json``."""
        return plain(self.__dict__)


STATS = (
    "examples", "train_s", "examples_per_s", "staleness_mean", "staleness_max", "steps",
    "function_evals", "portions_done", "backup_portions", "backup_wins", "restarts",
    "virtual_s", "virtual_examples_per_s", "virtual_eval_s", "bottleneck",
)  # fmt: skip
"""The result's stats an experiment keeps per run."""


class Context:
    """Where an experiment's sweep runs: the output directory, the runtime, the sizes, the
    seeds; :meth:`train` runs one job into its own run directory."""

    def __init__(
        self,
        out: Path,
        runtime: str,
        sizes: Mapping[str, Any],
        seeds: Sequence[int],
        quick: bool,
        log: Log | None = None,
    ) -> None:
        self.out = out
        self.runtime = runtime
        self.sizes = dict(sizes)
        self.seeds = list(seeds)
        self.quick = quick
        self.log = log or (lambda message: None)
        self.outcomes: list[Outcome] = []

    def train(
        self,
        name: str,
        model: torch.nn.Module,
        data: Data,
        *,
        val: Data | None = None,
        test: Data | None = None,
        runtime_options: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> Outcome:
        """Train ``model`` on ``data`` with ``settings`` (``train()``'s keyword arguments) on
        the context's runtime, recorded in ``<out>/runs/<name>``; evaluated on ``val`` during
        training and at the end, and its final model on ``test``. A run that diverges is an
        outcome with ``diverged=True``, not an error."""
        path = self.out / "runs" / name
        options = dict(runtime_options or {})
        recorded = {"experiment_run": name, "runtime": self.runtime, **settings}
        if options:
            recorded["runtime_options"] = options
        runlog = RunLog(path, plain(recorded), tensorboard=False)
        if settings.get("algorithm", "downpour") == "downpour":
            settings.setdefault("checkpoint_every", 0)  # only the final one, removed below
        start = time.perf_counter()
        try:
            result = train(
                model, data, loss="cross_entropy", eval_data=val, runtime=self.runtime,
                runtime_options=options or None, run_dir=runlog, **settings,
            )  # fmt: skip
        except TrainingDiverged as exc:
            found = re.search(r"at ([\d,]+) examples", exc.reason)
            at = int(found.group(1).replace(",", "")) if found else None
            outcome = Outcome(name, plain(settings), diverged=True, diverged_at=at,
                              reason=exc.reason)  # fmt: skip
        else:
            test_acc = accuracy(result.model, test) if test is not None else None
            outcome = Outcome(
                name, plain(settings), diverged=False, val_accuracy=result.history.accuracy,
                test_accuracy=test_acc,
                stats={k: plain(result.stats[k]) for k in STATS if k in result.stats},
                evals=[plain(p) for p in result.history.eval],
                losses=[plain(p) for p in result.history.train],
            )  # fmt: skip
        finally:
            # The experiment keeps what it plots (metrics.jsonl, config.toml), not the model.
            shutil.rmtree(path / "checkpoints", ignore_errors=True)
        self.outcomes.append(outcome)
        shown = "diverged" if outcome.diverged else f"val {fmt(outcome.val_accuracy)}"
        self.log(f"{name}: {shown} ({time.perf_counter() - start:.1f} s)")
        return outcome


def times(outcome: Outcome, runtime: str) -> tuple[float | None, list[float]]:
    """The run's training time and its evaluations' times: virtual on ``simulated``."""
    if runtime == "simulated":
        return outcome.stats.get("virtual_s"), list(outcome.stats.get("virtual_eval_s", []))
    return outcome.stats.get("train_s"), [p["wall_s"] for p in outcome.evals[:-1]]


def time_to(outcome: Outcome, runtime: str, target: float) -> float | None:
    """The time of the first evaluation during training at or above ``target`` accuracy."""
    if outcome.diverged:
        return None
    _, at = times(outcome, runtime)
    for t, p in zip(at, outcome.evals):
        if (p.get("accuracy") or 0.0) >= target:
            return t
    return None


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Data) -> float:
    """Share of ``data``'s rows whose arg-max output is the label."""
    x, y = data
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def validation_split(data: Data, fraction: float, seed: int = 0) -> tuple[Data, Data]:
    """``data`` cut into a training part and a validation part of ``fraction`` of its rows
    (a seeded permutation): learning rates and other settings are picked on the validation
    part, never on the test set."""
    x, y = data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(x) * fraction)))
    val, fit = order[:n_val], order[n_val:]
    return (x[fit], y[fit]), (x[val], y[val])


def mnist1d_splits(
    samples: int, fit_examples: int | None = None, val_fraction: float = 0.1
) -> tuple[Data, Data, Data]:
    """MNIST-1D of ``samples`` examples: (training, validation, test); the validation part
    is cut from the training set (80% of the samples), the test set is MNIST-1D's own.
    ``fit_examples``: keep only that many training rows (quick sizes)."""
    train_set, test_set = mnist1d(num_samples=samples)
    fit, val = validation_split(train_set, val_fraction)
    if fit_examples is not None:
        fit = (fit[0][:fit_examples], fit[1][:fit_examples])
    return fit, val, test_set


def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(kept) if kept else None


def fmt(value: Any, spec: str = ".3f") -> str:
    """A number for a table or a log line; ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def save(fig: Any, ax: Any, path: Path) -> Path:
    """Save with the legend below the axes (it never covers a curve)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ncols = 2 if len(handles) > 4 else 1
        fig.set_figheight(3.6 + 0.2 * -(-len(handles) // ncols))
        fig.legend(handles, labels, loc="outside lower center", fontsize="small", ncols=ncols,
                   frameon=False)  # fmt: skip
    fig.savefig(path)
    plt.close(fig)
    return path
