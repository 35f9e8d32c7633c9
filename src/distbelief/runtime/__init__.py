"""Runtimes that host distbelief's actors: one protocol, several implementations.

``base`` (the protocol, ``Actor``, refs, ``ActorRestarted``, ``DRIVER``), ``options`` (each
runtime's options, typed and checked), ``runqueue`` (the seeded run queue of ``local`` and of
each process of ``processes``), ``supervise`` (restart and replay, for ``local`` and ``ray``),
``faults`` (fault plans), then the runtimes: ``local``, ``processes``, ``ray/``, and
``simulated`` (``local``'s actors in virtual time on a modelled cluster).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..settings import RUNTIMES
from .base import DRIVER, Actor, Context, Runtime, receives
from .local import LocalRuntime
from .options import LocalOptions, ProcessesOptions, RayOptions, SimulatedOptions, Tap


def make_runtime(name: str, *, seed: int | None = None, **options: Any) -> Runtime:
    """Create the runtime called ``name`` ("local", "processes", "ray" or "simulated") with
    ``options`` (the fields of its :mod:`.options` class, checked there)."""
    if name == "local":
        return LocalRuntime(seed, **options)
    if name == "processes":
        from .processes import ProcessesRuntime

        return ProcessesRuntime(seed=seed, **options)
    if name == "ray":
        try:
            from .ray.runtime import RayRuntime
        except ImportError as exc:
            raise ConfigError(
                "runtime: 'ray' needs Ray; install it with pip install 'distbelief[ray]'"
            ) from exc
        return RayRuntime(seed=seed, **options)
    if name == "simulated":
        from .simulated import SimulatedRuntime

        return SimulatedRuntime(seed, **options)
    raise ConfigError(f"runtime: unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")


__all__ = [
    "DRIVER", "Actor", "Context", "LocalOptions", "LocalRuntime", "ProcessesOptions", "RUNTIMES",
    "RayOptions", "Runtime", "SimulatedOptions", "Tap", "make_runtime", "receives",
]  # fmt: skip
