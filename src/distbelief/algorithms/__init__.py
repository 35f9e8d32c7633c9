"""The training algorithms, each a package (config, messages, driver, actors) that registers
itself here; ``api.train`` and the command look an algorithm up by name and name none."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Algorithm:
    """One algorithm as the rest of the package sees it."""

    name: str
    """Its name, the value of ``algorithm=`` and ``--algorithm``."""
    config: type
    """Its frozen configuration dataclass (validated on construction)."""
    run: Callable[..., Any] | None = None
    """Runs it: the driver's entry point."""


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add ``algorithm`` to the registry (each algorithm's package does, when imported)."""
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def names() -> tuple[str, ...]:
    """The registered algorithms' names, the default (``downpour``) first."""
    return tuple(_REGISTRY)


def get(name: str) -> Algorithm:
    """The algorithm called ``name``; a ConfigError naming the choices if there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"algorithm: unknown algorithm {name!r}; choose one of {', '.join(names())}"
        ) from None


# Each package registers itself on import; this line is all a new algorithm adds here.
from . import downpour, sandblaster  # noqa: E402, F401
