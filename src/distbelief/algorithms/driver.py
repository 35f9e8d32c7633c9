"""The skeleton every algorithm's run shares: seed torch's RNG, create the runtime (or take the
one passed in), spawn and wire the actors, converse with the one that drives the run until it
reports done, pass progress on, keep what was trained when Ctrl-C or SIGTERM stops the run
(with a last checkpoint where checkpoints are on), build the result and evaluate it a last
time. An algorithm's driver fills in the hooks of :class:`Driver`; ``api.train`` checks the
inputs and hands a :class:`Job` over."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.formats import FileData
from ..data.inputs import TensorRows
from ..errors import ActorFailed, ConfigError, TrainingInterrupted
from ..evaluate import Evaluator, LossFn
from ..results import History, ProgressReport, TrainResult
from ..runtime import RUNTIMES, Runtime, make_runtime
from ..storage.checkpoint import Checkpoint
from .messages import Begin


@dataclass
class Job:
    """A run checked by ``api.train``, as it hands it to the algorithm's ``run``."""

    config: Any
    """The algorithm's configuration (its ``seed`` drawn, its defaults resolved)."""
    layers: list[nn.Module]
    """The model's layers (the initial parameters; never modified)."""
    stage_layers: list[list[nn.Module]]
    """The layers split into stages (one stage for an algorithm without stages)."""
    dtype: torch.dtype
    """The model's parameter dtype."""
    loss_fn: LossFn
    """The loss, resolved to a callable."""
    rows: TensorRows | FileData
    """The training data: in-memory rows or a data file."""
    evaluator: Evaluator | None = None
    """Evaluates on ``eval_data``; None without it."""
    progress: Callable[[ProgressReport], None] | None = None
    """Called with every progress report."""
    resume: Checkpoint | None = None
    """The checkpoint to carry on from, checked against this run."""
    checkpoint_meta: Any = None
    """JSON recorded in every checkpoint's manifest."""
    runtime: Runtime | None = None
    """A runtime passed in to ``train`` (which shuts it down), or None: the driver creates
    ``config.runtime`` with ``config.runtime_options`` and shuts it down itself."""


def runtime_name(runtime: Any) -> str | None:
    """The name a runtime instance is recorded by (``local``, ``processes``, ``ray``), None if
    ``runtime`` is not a runtime (a name, or anything else). An instance that names no known
    runtime is a ``ConfigError``: run directories and checkpoints record the name."""
    if isinstance(runtime, str) or not all(
        callable(getattr(runtime, method, None))
        for method in ("spawn", "tell", "converse", "shutdown")
    ):
        return None
    name = getattr(runtime, "name", None)
    if name not in RUNTIMES:
        raise ConfigError(
            f"runtime: a {type(runtime).__name__} instance must name one of "
            f"{', '.join(RUNTIMES)} (its name attribute), got {name!r}"
        )
    return name


class Driver:
    """One run of an algorithm over a runtime. :meth:`run` is the skeleton; a subclass sets
    ``done`` and fills in :meth:`start`, :meth:`result` and (if it needs them) the other hooks.
    A driver object serves one run."""

    done: type
    """The message the actor the driver converses with sends when the run is over."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.config = job.config

    def run(self) -> TrainResult:
        """Run, return the result (the final evaluation appended to its history)."""
        self.prepare()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            done, runtime_stats = self.converse()
        model, history, stats = self.result(done, runtime_stats)
        if self.job.evaluator is not None:
            final = self.job.evaluator.evaluate_final(model, done.examples, done.train_s, stats)
            history.eval.append(final)
        return TrainResult(model, history, stats, self.config)

    def converse(self) -> tuple[Any, dict[str, Any]]:
        """Spawn and wire every actor, run until the run is done, always shut down a runtime
        created here. Returns :meth:`finish`'s report and what the runtime says of the run
        (its ``describe()``, if it has one: Ray's the node each actor ran on)."""
        given = self.job.runtime
        rt = given
        if rt is None:
            rt = make_runtime(self.config.runtime, seed=self.config.seed, **self.runtime_options())
        try:
            partner = self.start(rt)
            try:
                for reply in rt.converse(partner, Begin(), timeout=self.config.timeout_s):
                    if isinstance(reply, self.done):
                        done = self.finish(rt, reply)
                        describe = getattr(rt, "describe", None)
                        return done, (describe() if describe is not None else {})
                    if isinstance(reply, ProgressReport):
                        self.report(reply)
                    self.receive(rt, reply)
            except KeyboardInterrupt as stop:
                # Ctrl-C or SIGTERM: the runtimes stop between two messages, so every actor
                # is whole and can be asked for what it holds (and a last checkpoint taken).
                signum = getattr(stop, "signum", signal.SIGINT)
                model, taken = self.stopped(rt)
                path, step = taken if taken is not None else (None, None)
                raise TrainingInterrupted(model, signum, path, step) from None
            except ActorFailed as exc:
                self.failed(rt, exc)
                raise
            raise RuntimeError("the runtime stopped without a result")  # pragma: no cover
        finally:
            if given is None:
                rt.shutdown()

    # ---------------------------------------------------------------- hooks

    def prepare(self) -> None:
        """Before the run, outside the seeded RNG: refuse what cannot run (a fault plan it
        cannot survive or never reaches), set up what the run writes (checkpoints)."""

    def runtime_options(self) -> dict[str, Any]:
        """The keyword arguments of the runtime this driver creates."""
        return dict(self.config.runtime_options)

    def start(self, rt: Runtime) -> Any:
        """Spawn and wire every actor; return the ref of the one to converse with."""
        raise NotImplementedError

    def report(self, report: ProgressReport) -> None:
        """A progress report: passed on to the caller's ``progress`` callback."""
        if self.job.progress is not None:
            self.job.progress(report)

    def receive(self, rt: Runtime, reply: Any) -> None:
        """Any message to the driver besides ``done`` (progress reports too, after
        :meth:`report`); raise to end the run."""

    def finish(self, rt: Runtime, done: Any) -> Any:
        """The run is over (the runtime still up): collect what the result needs; return the
        report :meth:`result` builds on (``done``, unless it adds to it)."""
        return done

    def trained(self, rt: Runtime) -> nn.Module | None:
        """The model trained so far, collected from the actors after a stop signal."""
        raise NotImplementedError

    def stopped(self, rt: Runtime) -> tuple[nn.Module | None, tuple[str, int] | None]:
        """After a stop signal: the model trained so far, and the last checkpoint written of
        it (its path and step) where checkpoints are on and something new was trained, else
        None. Here: :meth:`trained`, no checkpoint; an algorithm that checkpoints overrides
        it (the runtime still delivers, so a checkpoint round can run as during training)."""
        return self.trained(rt), None

    def failed(self, rt: Runtime, exc: ActorFailed) -> None:
        """An actor failed: raise something more telling than ``exc``, or return to let it
        end the run as it is."""

    def result(
        self, done: Any, runtime_stats: dict[str, Any]
    ) -> tuple[nn.Module, History, dict[str, Any]]:
        """The trained model, its history and stats (``runtime_stats`` among them); raise
        ``TrainingDiverged`` for a run that learned nothing finite."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared pieces

    def common_stats(self, examples: int, done: Any) -> dict[str, Any]:
        """The stats every algorithm reports: ``examples`` trained by this run, its training
        time and speed, the seed, the actors restarted, the checkpoint it resumed from."""
        resume = self.job.resume
        return {
            "examples": examples,
            "train_s": done.train_s,
            "examples_per_s": examples / done.train_s if done.train_s > 0 else float("nan"),
            "seed": self.config.seed,
            "restarts": done.restarts,
            "resumed_from": str(resume.path) if resume is not None else None,
        }
