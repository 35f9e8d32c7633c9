"""Errors raised by distbelief, each naming what went wrong."""

from __future__ import annotations

import signal
from typing import Any


class ConfigError(ValueError):
    """A user-facing input (config, model, data) is invalid; raised before any actor starts.

    The message starts with the name of the offending parameter, e.g. ``"stages: ..."``.
    """


class NothingToTrain(ConfigError):
    """A resumed run whose checkpoint has done every epoch asked for already: nothing is
    trained and nothing written (the CLI says so and exits 0)."""


class ActorFailed(RuntimeError):
    """An actor raised while handling a message; the run ended with this error."""

    def __init__(self, actor: str, message: str, cause: BaseException) -> None:
        super().__init__(f"actor {actor!r} failed while handling {message}: {cause!r}")
        self.actor = actor
        self.message = message
        self.cause = cause


class RunTimeout(TimeoutError):
    """A blocking wait ran past its timeout; the message says what was being waited for."""


class RunStopped(KeyboardInterrupt):
    """A runtime stopped a run between two messages because the process got a stop signal
    (SIGINT, i.e. Ctrl-C, or SIGTERM); ``signum`` says which. A KeyboardInterrupt, so code that
    handles Ctrl-C handles both."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Deadlock(RuntimeError):
    """The in-process runtime has no message left to deliver but the run is not finished."""


class TrainingDiverged(RuntimeError):
    """Training went wrong in a way more steps cannot fix: most steps' losses were NaN or Inf
    (so the shards rejected their pushes), an evaluation loss was, most pushes were rejected, or
    the final parameters hold NaN or Inf. A run that looks finished but learned nothing is never
    returned as a result.

    ``reason`` says what and when; ``model`` holds the shards' parameters when the run stopped
    (and replica 0's buffers) if they are all finite, else None; ``stats`` the run's counters
    where they were collected (an empty dict otherwise).
    """

    def __init__(self, reason: str, model: Any = None, stats: dict | None = None) -> None:
        kept = (
            "the parameters when it stopped are in .model"
            if model is not None
            else ("its parameters hold NaN or Inf, so none are kept")
        )
        super().__init__(f"training diverged: {reason}; {kept}")
        self.reason = reason
        self.model = model
        self.stats = stats or {}


class DataChanged(RuntimeError):
    """A data file changed or shrank while training; the message names it. Nothing trained
    until then is lost: ``model`` is a new module with the shards' parameters when it was
    found and replica 0's buffers (None if they could not be collected)."""

    def __init__(self, reason: str, model: Any = None) -> None:
        kept = (
            "the model trained until then is in .model"
            if model is not None
            else "the parameters could not be collected"
        )
        super().__init__(f"{reason}; {kept}")
        self.reason = reason
        self.model = model


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped :func:`distbelief.train`; nothing trained until then is lost.

    A KeyboardInterrupt, so an uncaught one ends a script as Ctrl-C does; caught, its ``model``
    is a new module with the shards' parameters at the interruption and replica 0's buffers,
    and ``signum`` the signal that stopped it (``signal.SIGINT`` or ``signal.SIGTERM``).
    A run that writes checkpoints writes a last one first: ``checkpoint`` is its path (a
    ``ckpt-<update>`` directory; resume from it or from its parent) and ``step`` where it is
    (Downpour: steps over all replicas; Sandblaster: L-BFGS steps), and ``model`` holds its
    parameters; both are None when nothing was written (checkpoints off, no step trained since
    the start, a diverged state or a failed write). A second Ctrl-C while they are being
    collected gives up on them (plain KeyboardInterrupt).
    """

    def __init__(
        self,
        model: Any,
        signum: int = signal.SIGINT,
        checkpoint: str | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__("training interrupted; the model trained so far is in .model")
        self.model = model
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
