"""``main``: the ``distbelief`` console script. Every failure becomes one line on stderr and an
exit status: 2 for invalid arguments, 1 for a failed run, 130 and 143 for Ctrl-C and SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import typer

from ..errors import ActorFailed, DataChanged, Deadlock, RunStopped, RunTimeout, TrainingDiverged
from . import experiment, tools, training  # noqa: F401  (each registers its commands with the app)
from .app import INTERRUPTED, RUN_ERROR, USAGE_ERROR, Interrupted, UsageFailure, app, strict_json
from .options import arrange_help

if hasattr(typer, "TyperException"):  # typer >= 0.26 vendors click; its errors derive from this
    _PARSE_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
else:  # pragma: no cover - older typer runs on click
    import click

    _PARSE_ERRORS = (click.ClickException,)


def _fail(message: str, code: int, as_json: bool = False) -> int:
    print(f"distbelief: error: {message}", file=sys.stderr)
    if as_json:  # whoever reads the last line of stdout gets a failure, not nothing
        print(strict_json({"error": message, "exit_status": code}))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``distbelief`` console script; returns the exit status.

    Click's own usage errors, our argument checks and ``ConfigError`` all become one line on
    stderr and status 2; a failed run becomes one line and status 1; Ctrl-C 130 and SIGTERM 143
    (a run stops between two messages and every worker is reaped, as for Ctrl-C).
    """
    command = typer.main.get_command(app)
    arrange_help(command)
    args = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:  # diagnostics (warnings and worse) on stderr
        logging.basicConfig(format="distbelief: %(levelname)s: %(name)s: %(message)s")
    with _sigterm_as_stop() as stopped:
        try:
            # standalone_mode=False: click's errors reach us instead of a multi-line rich panel
            rv = command.main(
                args=args or ["--help"], prog_name="distbelief", standalone_mode=False
            )
        except _PARSE_ERRORS as exc:
            return _fail(exc.format_message().replace("\n", " "), USAGE_ERROR)
        except UsageFailure as exc:
            return _fail(str(exc).replace("\n", " "), USAGE_ERROR)
        except DataChanged as exc:  # (its .model is the API's; here the run directory keeps it)
            return _fail(f"data: {exc.reason}", RUN_ERROR, "--json" in args)
        except (ActorFailed, RunTimeout, Deadlock, TrainingDiverged) as exc:
            return _fail(str(exc).replace("\n", " "), RUN_ERROR, "--json" in args)
        except (Interrupted, KeyboardInterrupt, typer.Abort) as exc:
            cause = exc.__cause__ or exc  # typer's Abort wraps the KeyboardInterrupt
            signum = getattr(cause, "signum", stopped[0] if stopped else signal.SIGINT)
            where = getattr(cause, "checkpoint", None), getattr(cause, "step", None)
            return _stopped(signum, *where)
    if rv == INTERRUPTED:  # a stop outside a run (e.g. generating data): typer's silent exit
        return _stopped(stopped[0] if stopped else signal.SIGINT)
    return rv if isinstance(rv, int) else 0


@contextlib.contextmanager
def _sigterm_as_stop() -> Iterator[list[int]]:
    """Outside a run (loading data, building the model), SIGTERM stops the command as Ctrl-C
    does: an exception, so clean-up code runs. (During a run the runtime takes both signals
    between two messages instead.) Yields the list of stop signals received."""
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)
        raise RunStopped(signum)

    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(signum: int, checkpoint: str | None = None, step: int | None = None) -> int:
    """One line and the shell's status for a stop signal: 130 for SIGINT, 143 for SIGTERM.
    The line says where the last checkpoint was written on the way out, if one was."""
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if checkpoint is not None:
        where = os.path.dirname(checkpoint)  # --resume takes the directory (the newest in it)
        what += (
            f": checkpoint at step {step} in {where}; resume with distbelief train --resume "
            f"{shlex.quote(where)}"
        )
    return _fail(what, 128 + signum)


def entry() -> None:
    """``[project.scripts]`` target: run :func:`main` and exit with its status."""
    sys.exit(main())
