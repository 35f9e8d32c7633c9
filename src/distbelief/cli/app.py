"""The ``distbelief`` typer application, its exit statuses and the exceptions its commands
raise for ``main`` to report on one line."""

from __future__ import annotations

import inspect
import json
import math
import signal
import sys
from collections.abc import Callable
from typing import Any

import typer

USAGE_ERROR = 2
"""Exit status for invalid arguments (the convention of click and of most Unix tools)."""
RUN_ERROR = 1
"""Exit status when a valid run fails (an actor raised, a timeout, a deadlock)."""
INTERRUPTED = 128 + signal.SIGINT
"""Exit status after Ctrl-C (130: 128 + SIGINT, as shells report it); after SIGTERM it is
143 (128 + SIGTERM)."""

app = typer.Typer(
    name="distbelief",
    help="DistBelief on PyTorch: train any nn.Sequential with Downpour SGD or Sandblaster "
    "L-BFGS over a sharded parameter server, on one core, one machine's cores or a Ray cluster.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class UsageFailure(Exception):
    """An invalid argument found by the command itself; ``main`` prints it on one line."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run; ``signum`` says which, ``checkpoint`` and ``step``
    where the run's last checkpoint was written on the way out (None: none was). (Not a
    KeyboardInterrupt: typer would turn that into a silent exit before ``main`` sees it.)"""

    def __init__(
        self, signum: int = signal.SIGINT, checkpoint: str | None = None, step: int | None = None
    ) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step


def seam(name: str) -> Any:
    """``distbelief.cli.<name>`` (``train``, ``available_memory``), looked up when called, so
    that a test can replace it on the package."""
    return getattr(sys.modules[__package__], name)


def prose(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: the command's docstring with each paragraph on one line, so that --help
    wraps it to the terminal (rich keeps a docstring's line breaks). Apply below
    ``@app.command``."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    command.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    return command


def opt(help_text: str, **kwargs: Any) -> Any:
    """A typer option with this help and no default shown."""
    return typer.Option(help=help_text, show_default=False, **kwargs)


def strict_json(value: Any) -> str:
    """JSON that every parser reads: NaN and Infinity (which json.dumps writes bare) become
    null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False)
