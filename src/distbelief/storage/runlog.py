"""A run directory: what a run leaves on disk to be studied, compared and plotted.

``RunLog(path)`` holds a run's directory, laid out as TensorBoard and Lightning users expect
one folder per run (``runs/<name>/``):

- ``metrics.jsonl``: one JSON object a line, each with a ``kind``:
  ``start`` (the resolved configuration), ``train`` (all replicas: examples, loss, examples/s),
  ``replica`` (per replica: step, examples, loss, examples/s), ``shard`` (per shard: updates
  applied and their rate, the staleness histogram), ``eval`` (examples seen, wall time, loss,
  accuracy), ``end`` (status and the final stats). Every record has ``wall_s``, seconds of
  training since the start (evaluation pauses excluded, as in the result's history); a run on
  the simulated runtime's records also have ``virtual_s``, the modelled cluster's seconds
  (:func:`set_virtual_clock`).
- ``config.toml``: the resolved configuration, loadable back with ``distbelief train --config``.
- TensorBoard event files with the same scalars (``tensorboard --logdir runs``), written by
  ``torch.utils.tensorboard``'s ``SummaryWriter``, with the examples seen as the step.

The driver writes it from the master's ``ProgressReport`` messages (the ``progress`` callback of
``train``); actors never touch files. Writing a line per report is cheap next to training
(``benchmarks/runlog_overhead.py`` measures it).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import tomli_w

from ..errors import ConfigError
from ..results import ProgressReport
from .dirlock import DirectoryLock

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CONFIG = "config.toml"
TENSORBOARD_EVERY_S = 20.0
"""Buffered TensorBoard events go to the writer this often (and at the end). Handing the
writer one event per report cost ~3-6 ms each on a busy 2-core machine (its thread wakes and
takes the GIL from training): 3-4% of examples/s, against under 1% for all the JSON lines.
TensorBoard's own writer flushes to disk every 120 s by default, so nothing is seen later."""


_virtual_clock: Callable[[], float] | None = None


def set_virtual_clock(clock: Callable[[], float] | None) -> None:
    """The virtual clock of a simulated run, set by its runtime while it runs (None after):
    every record written meanwhile has ``virtual_s`` beside ``wall_s``, the modelled cluster's
    seconds when the record's report reached the driver, which ``distbelief report`` then uses
    as its time axis."""
    global _virtual_clock
    _virtual_clock = clock


def default_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (local time), with ``-2``, ``-3``... if taken."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def prepare_dir(
    path: str | os.PathLike, name: str = "run_dir", marker: str = METRICS, holds: str = "a run"
) -> Path:
    """Create ``path`` (and its parents) and prove it writable, before anything is trained.

    Raises ``ConfigError`` starting with ``name`` when a file is in the way, the directory
    cannot be created or written, or it already holds ``holds`` (its file ``marker``: a second
    run's lines would mix with the first's in the plots)."""
    p = Path(path)
    try:
        p.mkdir(parents=True)
    except FileExistsError:
        if not p.is_dir():
            raise ConfigError(f"{name}: {str(p)!r} exists and is not a directory") from None
    except NotADirectoryError:
        raise ConfigError(f"{name}: cannot create {str(p)!r}: a file is in the way") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot create {str(p)!r}: {exc.strerror or exc}") from None
    if (p / marker).exists():
        raise ConfigError(
            f"{name}: {str(p)!r} already holds {holds} ({marker}); choose another directory"
        )
    probe = p / f".distbelief-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot write in {str(p)!r}: {exc.strerror or exc}") from None
    return p


def _made(path: str | os.PathLike, name: str) -> Path:
    """``path`` made (with its parents) if missing, so it can be locked; what is wrong with
    it otherwise is left to :func:`prepare_dir` to say."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{name}: {str(p)!r} exists and is not a directory") from None
    except NotADirectoryError:
        raise ConfigError(f"{name}: cannot create {str(p)!r}: a file is in the way") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot create {str(p)!r}: {exc.strerror or exc}") from None
    return p


def plain(value: Any) -> Any:
    """``value`` as JSON/TOML-friendly data: tuples become lists, dataclasses dicts, anything
    else that is not a number, string, bool or None its ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _toml_ready(value: Any) -> Any:
    """TOML has no null: drop None values (an absent key means the default)."""
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_toml_ready(v) for v in value if v is not None]
    return value


def write_config(path: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """Write ``config`` as TOML (None values left out)."""
    with open(path, "wb") as f:
        tomli_w.dump(_toml_ready(plain(config)), f)


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: None instead."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


class RunLog:
    """The writer of one run directory (see the module doc).

    ``config`` is the configuration the directory records (``config.toml`` and the start
    record); given None, :meth:`start` records the engine's configuration instead. Construct
    it before training: an unusable directory raises ``ConfigError`` naming it."""

    def __init__(
        self,
        path: str | os.PathLike,
        config: Mapping[str, Any] | None = None,
        *,
        name: str = "run_dir",
        tensorboard: bool = True,
    ) -> None:
        # Locked before the check for an earlier run's metrics: a run still writing there is
        # named by its pid, and two runs starting at once cannot both pass the check.
        self._lock = DirectoryLock(_made(path, name), name).acquire()
        try:
            self.path = prepare_dir(path, name)
        except BaseException:
            self._lock.release()
            raise
        self.config: dict[str, Any] | None = dict(config) if config is not None else None
        self.tensorboard = tensorboard
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._last_total: tuple[float, int] = (0.0, 0)  # (wall_s, examples) of the last report
        self._last_replica: dict[int, tuple[float, int]] = {}
        self._last_shard: dict[int, tuple[float, int]] = {}
        self._pending: list[tuple[str, float]] = []  # scalars of the report being logged
        self._events: list[tuple[int, float, list[tuple[str, float]]]] = []  # not yet written
        self._written_at = time.monotonic()
        self.closed = False

    def discard(self) -> None:
        """Remove the directory if nothing was written in it (a run refused before it began)."""
        self._lock.release()
        if self._file is None:
            try:
                self.path.rmdir()
            except OSError:
                pass  # not empty, or not ours to remove

    # ---------------------------------------------------------------- lifecycle

    def start(self, engine: Mapping[str, Any]) -> None:
        """Write ``config.toml`` and the start record; open the TensorBoard writer."""
        engine = plain(engine)
        if self.config is None:
            self.config = dict(engine)
        write_config(self.path / CONFIG, self.config)
        self._file = open(self.path / METRICS, "w", encoding="utf-8")  # noqa: SIM115
        if self.tensorboard:
            # Imported here: tensorboard takes a second to import, and only runs that log
            # need it.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path))
            self._writer.add_text(
                "config", "\n".join(f"    {k} = {v!r}" for k, v in self.config.items())
            )
        self._record(
            {
                "kind": "start",
                "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "wall_s": 0.0,
                "config": plain(self.config),
                "engine": engine,
            }
        )

    def __call__(self, report: ProgressReport) -> None:
        """Log one of the master's progress reports (use as ``train``'s ``progress``)."""
        if self._file is None:
            return
        step = report.examples
        if report.evaluation is not None:
            self.evaluation({"examples": step, "wall_s": report.wall_s, **report.evaluation})
            return
        wall0, ex0 = self._last_total
        rate = (step - ex0) / (report.wall_s - wall0) if report.wall_s > wall0 else None
        self._last_total = (report.wall_s, step)
        self._record(
            {
                "kind": "train",
                "examples": step,
                "total_examples": report.total_examples,
                "wall_s": report.wall_s,
                "loss": _finite(report.loss),
                "examples_per_s": rate,
            }
        )
        self._scalar("train/loss", report.loss, step)
        self._scalar("train/examples_per_s", rate, step)
        for r, examples in enumerate(report.replica_examples):
            wall0, ex0 = self._last_replica.get(r, (0.0, 0))
            if examples == ex0:
                continue  # nothing new from this replica since its last line
            rate = (examples - ex0) / (report.wall_s - wall0) if report.wall_s > wall0 else None
            self._last_replica[r] = (report.wall_s, examples)
            loss = report.replica_loss[r] if r < len(report.replica_loss) else None
            self._record(
                {
                    "kind": "replica",
                    "replica": r,
                    "step": report.replica_steps[r],
                    "examples": examples,
                    "wall_s": report.wall_s,
                    "loss": _finite(loss),
                    "examples_per_s": rate,
                }
            )
            self._scalar(f"replica{r}/examples_per_s", rate, step)
            self._scalar(f"replica{r}/loss", loss, step)
        for k, stats in enumerate(report.shard_stats):
            self.shard(k, stats, step)
        self._flush_scalars(step)

    def shard(self, k: int, stats: Mapping[str, Any], step: int) -> None:
        """Log shard ``k``'s counters (skipped when they have not moved)."""
        wall = float(stats.get("wall_s", 0.0))
        applied = int(stats["updates_applied"])
        wall0, applied0 = self._last_shard.get(k, (0.0, 0))
        if k in self._last_shard and applied == applied0:
            return
        rate = (applied - applied0) / (wall - wall0) if wall > wall0 else None
        self._last_shard[k] = (wall, applied)
        mean = stats["staleness_sum"] / applied if applied else 0.0
        self._record(
            {
                "kind": "shard",
                "shard": k,
                "examples": step,
                "wall_s": wall,
                "updates_applied": applied,
                "updates_per_s": rate,
                "rejected_pushes": int(stats["rejected_pushes"]),
                "staleness_mean": mean,
                "staleness_max": int(stats["staleness_max"]),
                "staleness_histogram": list(stats.get("staleness_histogram", [])),
            }
        )
        self._scalar(f"shard{k}/updates_applied", applied, step)
        self._scalar(f"shard{k}/updates_per_s", rate, step)
        self._scalar(f"shard{k}/staleness_mean", mean, step)

    def evaluation(self, point: Mapping[str, Any], final: bool = False) -> None:
        """Log one evaluation: ``examples``, ``wall_s``, ``loss`` and maybe ``accuracy``."""
        if self._file is None:
            return
        record = {"kind": "eval", **{k: _finite(v) for k, v in point.items()}, "final": final}
        self._record(record)
        for key in ("loss", "accuracy"):
            if key in point:
                self._scalar(f"eval/{key}", point[key], int(point["examples"]))
        self._flush_scalars(int(point["examples"]))

    def finish(self, stats: Mapping[str, Any], final_eval: Mapping[str, Any] | None) -> None:
        """Log the final evaluation and the end record; close the files."""
        if final_eval is not None:
            if stats.get("virtual_s") is not None and "virtual_s" not in final_eval:
                # a simulated run's final evaluation: at its virtual end (the clock is gone)
                final_eval = {**final_eval, "virtual_s": stats["virtual_s"]}
            self.evaluation(final_eval, final=True)
        self.close("done", stats)

    def close(self, status: str = "done", stats: Mapping[str, Any] | None = None) -> None:
        """Write the end record (``status``: done, failed, interrupted) and close. Idempotent."""
        if self.closed or self._file is None:
            self.closed = True
            self._lock.release()
            return
        self.closed = True
        stats = plain(dict(stats or {}))
        self._record(
            {
                "kind": "end",
                "status": status,
                "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "wall_s": _finite(stats.get("train_s")),
                "stats": {k: _finite(v) for k, v in stats.items()},
            }
        )
        if self._writer is not None:
            self._write_events()
            hist = stats.get("staleness_histogram") or []
            if sum(hist):
                self._staleness_histogram(hist, int(stats.get("examples", 0)))
            self._writer.close()
        self._file.close()
        self._lock.release()
        log.info("run directory: %s", self.path)

    # ---------------------------------------------------------------- writing

    def _record(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        if _virtual_clock is not None and "wall_s" in record:
            record["virtual_s"] = _virtual_clock()
        # One line per record, flushed: a run that dies leaves every line written so far.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def _scalar(self, tag: str, value: float | None, step: int) -> None:
        if self._writer is not None and value is not None and math.isfinite(value):
            self._pending.append((tag, float(value)))

    def _flush_scalars(self, step: int) -> None:
        """Keep the report's scalars as one event; hand the kept events to the writer every
        ``TENSORBOARD_EVERY_S`` seconds."""
        if self._pending:
            self._events.append((step, time.time(), list(self._pending)))
            self._pending.clear()
        if time.monotonic() - self._written_at >= TENSORBOARD_EVERY_S:
            self._write_events()

    def _write_events(self) -> None:
        """One event per report, holding its scalars: the same records as ``add_scalar``
        writes (``simple_value``), at a sixteenth of its cost per scalar (~14 us against
        ~220 us, measured)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        for step, walltime, scalars in self._events:
            values = [Summary.Value(tag=tag, simple_value=v) for tag, v in scalars]
            self._writer.file_writer.add_summary(Summary(value=values), step, walltime)
        self._events.clear()
        self._written_at = time.monotonic()

    def _staleness_histogram(self, counts: list[int], step: int) -> None:
        """The final staleness histogram as a TensorBoard histogram (one bucket per value)."""
        values = range(len(counts))
        n = sum(counts)
        self._writer.add_histogram_raw(
            "staleness",
            min=min(v for v, c in zip(values, counts) if c),
            max=max(v for v, c in zip(values, counts) if c),
            num=n,
            sum=sum(v * c for v, c in zip(values, counts)),
            sum_squares=sum(v * v * c for v, c in zip(values, counts)),
            bucket_limits=[v + 0.5 for v in values],
            bucket_counts=list(counts),
            global_step=step,
        )


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run directory's ``metrics.jsonl`` (a torn last line is skipped)."""
    records = []
    with open(Path(path) / METRICS, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a run killed mid-write
    return records
