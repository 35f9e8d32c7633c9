"""Each runtime's options (``runtime_options`` of :func:`distbelief.train`), typed: one frozen
dataclass per runtime, whose fields are the options the runtime takes and whose construction
checks them. :func:`parse` turns the untyped mapping the API and the CLI pass into one of them;
it is the one place an option is refused (an unknown name, a bad value), with the same messages
on every runtime.

Adding an option to a runtime is a field here (with its check in ``__post_init__``), the code in
the runtime that uses it, a test and a line in the runtime's docs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from . import faults as fault_plans
from .ray.placement import STRATEGIES
from .ray.wire import FlowControl

SHARD_UPDATES = ("locked", "hogwild")
"""How a shared shard applies pushes from several processes (``shard_updates``)."""

Tap = Callable[[str, str, Any], Any]
"""A message tap: called as ``tap(sender, receiver, message)`` (actor names; ``"driver"`` for
the driver) as each message is put into its receiver's mailbox, before it is delivered. It may
only look (a tap for tests and tools); one that returns ``False`` loses the message on its way
(a test of lost messages)."""


def _check_max_restarts(value: Any) -> None:
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"runtime_options: max_restarts must be >= 0, got {value!r}")


def _check_tap(value: Any) -> None:
    if value is not None and not callable(value):
        raise ConfigError(
            f"runtime_options: tap must be a function tap(sender, receiver, message), got {value!r}"
        )


def _plan(options: Any) -> None:
    """Normalise the ``faults`` field into a plan (:func:`.faults.plan`), checking it."""
    object.__setattr__(options, "faults", fault_plans.plan(options.faults))


@dataclass(frozen=True)
class LocalOptions:
    """Options of the in-process runtime (:class:`~.local.LocalRuntime`)."""

    runtime: ClassVar[str] = "local"
    faults: Any = None
    """A fault plan (:mod:`.faults`); a tuple of ``Fault`` and ``Delay`` once parsed."""
    max_restarts: int = 5
    """Restarts allowed per actor."""
    tap: Tap | None = None
    """Sees every message the run sends (see :data:`Tap`)."""

    def __post_init__(self) -> None:
        _plan(self)
        _check_max_restarts(self.max_restarts)
        _check_tap(self.tap)


@dataclass(frozen=True)
class ProcessesOptions:
    """Options of the processes runtime (:class:`~.processes.ProcessesRuntime`)."""

    runtime: ClassVar[str] = "processes"
    processes: int | None = None
    """Worker processes; None: as many as replica groups, at most the machine's CPUs."""
    threads_per_process: int = 1
    """Torch intra-op threads per worker; 0 leaves torch's."""
    faults: Any = None
    """A fault plan (:mod:`.faults`); a tuple of ``Fault`` and ``Delay`` once parsed."""
    max_restarts: int = 0
    """Accepted for the other runtimes' sake: nothing is restarted here."""
    shard_updates: str = "locked"
    """``"locked"``: a shared shard applies one push at a time; ``"hogwild"``: at once."""
    tap: Tap | None = None
    """Sees every message, in the process that hosts its receiver (see :data:`Tap`)."""

    def __post_init__(self) -> None:
        if self.shard_updates not in SHARD_UPDATES:
            raise ConfigError(
                f"runtime_options: shard_updates must be one of {', '.join(SHARD_UPDATES)}, "
                f"got {self.shard_updates!r}"
            )
        _check_max_restarts(self.max_restarts)
        _plan(self)
        processes = self.processes
        ok = processes is None or (isinstance(processes, int) and processes >= 1)
        if not ok or isinstance(processes, bool):
            raise ConfigError(
                f"runtime_options: processes must be an integer >= 1, got {processes!r}"
            )
        threads = self.threads_per_process
        if not isinstance(threads, int) or threads < 0:
            raise ConfigError(
                f"runtime_options: threads_per_process must be an integer >= 0, got {threads!r}"
            )
        _check_tap(self.tap)


@dataclass(frozen=True)
class RayOptions:
    """Options of the Ray runtime (:class:`~.ray.runtime.RayRuntime`, which documents each)."""

    runtime: ClassVar[str] = "ray"
    address: str | None = None
    placement: str | Mapping[str, str] = "spread"
    faults: Any = None
    max_restarts: int = 5
    health_period_s: float = 0.5
    startup_timeout_s: float = 600.0
    threads_per_actor: int = 1
    num_cpus: int | None = None
    flow_window_bytes: int = FlowControl.window
    flow_timeout_s: float = FlowControl.timeout_s
    reuse_hosts: bool = True
    """Inside a ``local_ray()`` block, run actors in the idle processes of earlier runs and
    leave this run's for later ones (a failed run leaves none); False: fresh ones, none left."""

    def __post_init__(self) -> None:
        if not isinstance(self.reuse_hosts, bool):
            raise ConfigError(
                f"runtime_options: reuse_hosts must be True or False, got {self.reuse_hosts!r}"
            )
        window = self.flow_window_bytes
        if not isinstance(window, int) or window < 0:
            raise ConfigError(
                "runtime_options: flow_window_bytes must be a whole number of bytes >= 0 "
                f"(0: no flow control), got {window!r}"
            )
        timeout = self.flow_timeout_s
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(
                f"runtime_options: flow_timeout_s must be a number > 0, got {timeout!r}"
            )
        if not isinstance(self.placement, Mapping) and self.placement not in STRATEGIES:
            raise ConfigError(
                f"runtime_options: placement must be one of {', '.join(STRATEGIES)} or "
                f"{{actor name: node id}}, got {self.placement!r}"
            )
        _check_max_restarts(self.max_restarts)
        _plan(self)


Options = LocalOptions | ProcessesOptions | RayOptions
OPTIONS: dict[str, type[Options]] = {
    cls.runtime: cls for cls in (LocalOptions, ProcessesOptions, RayOptions)
}
"""Runtime name -> its options."""


def names(cls: type[Options]) -> list[str]:
    """The options a runtime takes, in their declared order."""
    return [f.name for f in dataclasses.fields(cls)]


def parse(runtime: str, options: Mapping[str, Any]) -> Options:
    """``options`` (a plain mapping) as the typed options of ``runtime``, checked: an unknown
    name or a bad value is a :class:`ConfigError` naming it."""
    cls = OPTIONS[runtime]
    takes = names(cls)
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ConfigError(
            f"runtime_options: unknown option(s) {unknown} for the {runtime} runtime; "
            f"it takes {', '.join(takes)}"
        )
    return cls(**options)


def fields_of(options: Options) -> dict[str, Any]:
    """The options as keyword arguments (no copy of their values, unlike ``asdict``)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


__all__ = ["OPTIONS", "LocalOptions", "Options", "ProcessesOptions", "RayOptions", "Tap", "parse"]
