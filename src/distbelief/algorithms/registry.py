"""The registry of algorithms: each algorithm's package registers an :class:`Algorithm` when
imported (``algorithms/__init__.py`` imports them all); ``api.train`` and the command look
one up by name and name none."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..data.formats import FileData
    from ..data.inputs import TensorRows
    from ..results import TrainResult
    from ..storage.checkpoint import Checkpoint
    from .driver import Job


@dataclass(frozen=True)
class Algorithm:
    """One algorithm as the rest of the package sees it: what ``api.train`` calls, in order,
    is ``configure`` (its arguments to a config), ``memory`` and ``check`` (once the model and
    the data are known), ``resume`` (with a checkpoint to carry on from), then ``run``."""

    name: str
    """Its name, the value of ``algorithm=`` and ``--algorithm``."""
    config: type
    """Its frozen configuration dataclass (validated on construction)."""
    run: Callable[[Job], TrainResult]
    """Runs a checked job: the driver's entry point."""
    configure: Callable[[dict[str, Any]], tuple[Any, Checkpoint | None]]
    """``train()``'s settings (its keyword arguments that shape the config, by name, as given;
    ``runtime`` as a name) to a validated config, and the checkpoint loaded to resume from if
    loading it was needed to make the config (else None). Refuses, naming the argument, what
    the algorithm does not take (of the arguments in ``takes``)."""
    memory: Callable[[Any], tuple[int, str]]
    """Parameter-sized vectors of state the run keeps per parameter besides the replicas' and
    the shards' copies, and what they are (for the check of the machine's memory)."""
    check: Callable[[Any, dict[str, Any], list[nn.Module], TensorRows | FileData, torch.dtype], Any]
    """``(config, settings, layers, rows, dtype)``: the algorithm's own checks of the model and
    the data; returns the config with the defaults that depend on them resolved."""
    resume: Callable[[Any, list[list[nn.Module]], int, Checkpoint | None], Checkpoint]
    """``(config, stage_layers, train_examples, loaded)``: load (unless ``loaded``) and check
    ``config.resume`` against this run; returns the checkpoint to carry on from."""
    title: str = ""
    """Its name in messages ("Downpour"); the name capitalised if empty."""
    required: Mapping[str, Any] = field(default_factory=dict)
    """Settings it has no default for, each with an example value for the refusal."""
    takes: tuple[str, ...] = ()
    """``train()`` arguments it handles itself although its config has no such field (to
    refuse them with a message of its own)."""
    options: tuple[str, ...] = ()
    """Its own keys of ``runtime_options`` (the rest are the runtime's)."""

    @property
    def label(self) -> str:
        """Its name as messages write it."""
        return self.title or self.name.capitalize()

    def settings(self) -> frozenset[str]:
        """The names of its config's fields."""
        return frozenset(f.name for f in dataclasses.fields(self.config))


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


def refuse_others(algorithm: Algorithm, given: Mapping[str, Any]) -> None:
    """Refuse a setting ``given`` (passed with a value, not left at its default) that
    ``algorithm``'s config does not have but another registered algorithm's does: a
    ConfigError naming the setting and the algorithm it belongs to."""
    own = algorithm.settings()
    for name, value in given.items():
        if value is None or name in own or name in algorithm.takes:
            continue
        for other in _REGISTRY.values():
            if other is not algorithm and name in other.settings():
                raise ConfigError(
                    f"{name}: a {other.label} option; {algorithm.name} does not take it"
                )


def require(algorithm: Algorithm, settings: Mapping[str, Any]) -> None:
    """Refuse a run that leaves out a setting ``algorithm`` has no default for, with an
    example value."""
    for name, example in algorithm.required.items():
        if settings.get(name) is None:
            raise ConfigError(f"{name}: {algorithm.label} needs it (e.g. {name}={example})")
