"""Runtimes that host distbelief's actors: one protocol, several implementations."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Actor, Context, Runtime, receives
from .local import LocalRuntime

RUNTIMES = ("local", "processes", "ray")


def make_runtime(name: str, *, seed: int | None = None, **options: Any) -> Runtime:
    """Create the runtime called ``name`` ("local", "processes" or "ray")."""
    if name == "local":
        unknown = sorted(set(options) - {"faults", "max_restarts"})
        if unknown:
            raise ConfigError(
                f"runtime_options: unknown option(s) {unknown} for the local runtime; "
                "it takes faults, max_restarts"
            )
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
    raise ConfigError(f"runtime: unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")


__all__ = ["Actor", "Context", "LocalRuntime", "RUNTIMES", "Runtime", "make_runtime", "receives"]
