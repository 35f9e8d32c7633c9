"""The live view of a run's progress on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from ..results import ProgressReport


def _staleness_mean(report: ProgressReport) -> float | None:
    applied = sum(st["updates_applied"] for st in report.shard_stats)
    return sum(st["staleness_sum"] for st in report.shard_stats) / applied if applied else None


class _LiveView:
    """Shows the master's progress reports on stderr: examples/s, loss, the last test
    accuracy, the mean staleness and, with several replicas, each replica's progress.

    On a terminal it is a live rich display; to a pipe or a file it prints plain lines (no
    control characters) at every tenth of the run and at every evaluation."""

    MAX_REPLICA_ROWS = 32
    """Above this many replicas only the totals are shown."""

    def __init__(
        self, console: Console, label: str, replicas: int, enabled: bool = True, header: str = ""
    ) -> None:
        self.console = console
        self.header = header  # printed at the first report: a refused input stays one line
        self.label = label
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.replicas = replicas if 1 < replicas <= self.MAX_REPLICA_ROWS else 0
        self.accuracy: float | None = None
        self.staleness: float | None = None
        self.replica_loss: dict[int, float] = {}  # each replica's last reported loss
        self.next_line = 0.0  # fraction of the run at which the next plain line is due
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=10),
            TaskProgressColumn(),
            TextColumn("{task.fields[text]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not self.live,
        )
        self.task = self.progress.add_task(label, total=None, text="")
        self.replica_tasks = [
            self.progress.add_task(f" r{r}", total=None, text="") for r in range(self.replicas)
        ]

    def __call__(self, report: ProgressReport) -> None:
        if self.header and self.enabled:
            print(self.header, file=self.console.file, flush=True)
            self.header = ""
        if report.evaluation is not None:
            self.accuracy = report.evaluation.get("accuracy", self.accuracy)
        if report.shard_stats:
            self.staleness = _staleness_mean(report)
        rate = report.examples / report.wall_s if report.wall_s > 0 else 0.0
        for r, loss in enumerate(report.replica_loss):
            if loss is not None:
                self.replica_loss[r] = loss
        text = (
            f"{report.examples:,}/{report.total_examples:,} examples  {rate:,.0f} ex/s  "
            f"loss {report.loss:.4f}  test acc "
            + ("-" if self.accuracy is None else f"{self.accuracy:.3f}")
            + "  staleness "
            + ("-" if self.staleness is None else f"{self.staleness:.2f}")
        )
        per_replica = [
            f"{n:,} examples  {n / report.wall_s if report.wall_s > 0 else 0:,.0f} ex/s  loss "
            + ("-" if loss is None else f"{loss:.4f}")
            for n, loss in zip(
                report.replica_examples,
                [self.replica_loss.get(r) for r in range(len(report.replica_examples))],
            )
        ][: self.replicas]
        if self.live:  # compact: one terminal row (80 columns) per line
            if not self.progress.live.is_started:
                self.progress.start()  # at the first report: an input refused before it is one line
            total = report.total_examples
            short = (
                f"{rate:,.0f} ex/s  loss {report.loss:.3f}  acc "
                + ("-" if self.accuracy is None else f"{self.accuracy:.3f}")
                + "  stale "
                + ("-" if self.staleness is None else f"{self.staleness:.2f}")
            )
            self.progress.update(self.task, completed=report.examples, total=total, text=short)
            share = total / max(len(report.replica_examples), 1)
            for r, (task, n) in enumerate(zip(self.replica_tasks, report.replica_examples)):
                loss = self.replica_loss.get(r)
                line = f"{n / report.wall_s if report.wall_s > 0 else 0:,.0f} ex/s  loss " + (
                    "-" if loss is None else f"{loss:.3f}"
                )
                self.progress.update(task, completed=n, total=share, text=line)
            return
        done = report.examples / report.total_examples if report.total_examples else 1.0
        if not self.enabled or (done < self.next_line and report.evaluation is None):
            return
        while self.next_line <= done:
            self.next_line += 0.1
        print(f"{self.label} {done:4.0%} {text}", file=self.console.file, flush=True)
        for r, line in enumerate(per_replica):
            print(f"  replica {r}: {line}", file=self.console.file, flush=True)

    def __enter__(self) -> _LiveView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
