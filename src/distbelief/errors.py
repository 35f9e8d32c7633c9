"""Errors raised by distbelief, each naming what went wrong."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A user-facing input (config, model, data) is invalid; raised before any actor starts.

    The message starts with the name of the offending parameter, e.g. ``"stages: ..."``.
    """


class ActorFailed(RuntimeError):
    """An actor raised while handling a message; the run ended with this error."""

    def __init__(self, actor: str, message: str, cause: BaseException) -> None:
        super().__init__(f"actor {actor!r} failed while handling {message}: {cause!r}")
        self.actor = actor
        self.message = message
        self.cause = cause


class RunTimeout(TimeoutError):
    """A blocking wait ran past its timeout; the message says what was being waited for."""


class Deadlock(RuntimeError):
    """The in-process runtime has no message left to deliver but the run is not finished."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`distbelief.train`; nothing trained until then is lost.

    A KeyboardInterrupt, so an uncaught one ends a script as Ctrl-C does; caught, its ``model``
    is a new module with the shards' parameters at the interruption and replica 0's buffers.
    A second Ctrl-C while they are being collected gives up on them (plain KeyboardInterrupt).
    """

    def __init__(self, model: Any) -> None:
        super().__init__("training interrupted; the model trained so far is in .model")
        self.model = model
