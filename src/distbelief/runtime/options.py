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
    """Worker processes; None: one per (replica, stage) pair, at most the machine's CPUs."""
    threads_per_process: int = 1
    """Torch intra-op threads per worker; 0 leaves torch's."""
    faults: Any = None
    """A fault plan (:mod:`.faults`); a tuple of ``Fault`` and ``Delay`` once parsed."""
    max_restarts: int = 5
    """Restarts allowed per actor."""
    shard_updates: str = "locked"
    """``"locked"``: a shared shard applies one push at a time (to each segment);
    ``"hogwild"``: at once."""
    tap: Tap | None = None
    """Sees every message, in the process that hosts its receiver (see :data:`Tap`)."""
    profile: bool = False
    """Time every handler and the wire in each process: ``stats["profile"]`` (runtime/profile)."""

    def __post_init__(self) -> None:
        if not isinstance(self.profile, bool):
            raise ConfigError(
                f"runtime_options: profile must be True or False, got {self.profile!r}"
            )
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


COMPUTE = ("modelled", "measured")
"""How the simulated runtime costs a handler (``compute``): the FLOPs it ran over a rate, or
its thread CPU time."""


def _positive(name: str, value: Any, *, zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (value >= 0 if zero else value > 0) or value != value or value == _INF:
        bound = ">= 0" if zero else "> 0"
        raise ConfigError(f"runtime_options: {name} must be a finite number {bound}, got {value!r}")


_INF = float("inf")


@dataclass(frozen=True)
class SimulatedOptions:
    """Options of the simulated runtime (:class:`~.simulated.SimulatedRuntime`): the modelled
    cluster. Every actor runs in this process with its real arithmetic; what these describe
    decides only *when* each message is delivered, in virtual time (docs/simulated.md)."""

    runtime: ClassVar[str] = "simulated"
    machines: int = 8
    """Machines in the cluster (named m0, m1, ...)."""
    cores: int = 4
    """Cores of each machine: at most this many of its actors handle a message at once."""
    speeds: tuple[float, ...] | None = None
    """Relative speed of each machine (one per machine; 0.2: five times slower, a
    straggler); None: all 1."""
    placement: str | Mapping[str, int] = "spread"
    """``"spread"`` (as the Ray runtime spreads actors over nodes: a replica's stages on
    distinct machines, the others round-robin), ``"pack"`` (all on m0), or {actor name or
    replica prefix: machine index}, the others spread."""
    compute: str = "modelled"
    """``"modelled"``: a handler costs the FLOPs it ran (matrix products and convolutions,
    counted from shapes) plus ``flops_per_element`` per tensor element of its message, over
    ``core_flops``, plus ``message_s``; deterministic. ``"measured"``: its thread CPU time
    times ``time_scale``."""
    core_flops: float = 1e10
    """FLOP/s of one core at relative speed 1 (modelled compute)."""
    flops_per_element: float = 2.0
    """Elementwise work per element of the tensors a message carries (a shard's update, a
    copy), in FLOPs (modelled compute)."""
    message_s: float = 20e-6
    """Fixed cost of handling one message at relative speed 1, in seconds (modelled)."""
    message_type_s: Mapping[str, float] | None = None
    """Fixed costs by message type (its class name: ``{"Forward": 12e-6}``) used instead of
    ``message_s`` for those types, in seconds (modelled): calibration measures each kind of
    handler that runs neither layers nor an update rule, from a shard's fetch (a copy of its
    segment under its lock) to a stage's forward that only asks for one. None: ``message_s``
    for every message."""
    layer_s: float = 0.0
    """Fixed cost of each layer call a handler runs, forward or backward (a module call's
    Python and autograd bookkeeping beyond its FLOPs), in seconds (modelled)."""
    update_s: float = 0.0
    """Fixed cost of each update-rule step a handler runs (a ``torch.optim`` optimizer's
    ``step``, as a parameter shard applies a push), in seconds (modelled)."""
    update_flops_per_element: float = 0.0
    """Elementwise work of an update-rule step per parameter element it updates, in FLOPs
    (modelled)."""
    send_s: float = 0.0
    """CPU cost to the sender's core of each message it sends to another machine
    (serialising it: a process's pickling and pipe write), in seconds."""
    receive_s: float = 0.0
    """CPU cost to the receiver's core of each message from another machine (reading and
    unpickling it), in seconds."""
    jitter: float = 0.0
    """Each handler's cost is multiplied by a factor drawn uniformly from [1 - jitter,
    1 + jitter] (seeded by the run's seed: the same seed, the same virtual times), as real
    handlers vary; 0: none (replicas of equal cost stay in lockstep)."""
    shared: bool = False
    """Host the actors whose class is ``shareable`` (Downpour's parameter shards) on every
    machine at once, as the processes runtime does over shared memory: a message to one is
    handled on its sender's machine, on a core there, with no network; still one message at a
    time (its lock). False: each on its machine, as on Ray and a real cluster."""
    time_scale: float = 1.0
    """Measured compute: virtual seconds per second of the handler's thread CPU time."""
    bandwidth_Bps: float = 1.25e9
    """Each machine's link, each direction, in bytes/s (1.25e9: 10 Gbit/s)."""
    latency_s: float = 50e-6
    """Network latency between two machines, per message, in seconds."""
    local_latency_s: float = 1e-6
    """Latency of a message between two actors of one machine (or to/from the driver)."""
    header_bytes: int = 64
    """Bytes a message carries besides its tensors."""
    send_byte_s: float = 0.0
    """Sender's CPU seconds per byte of a message to another machine (copying it out: on
    processes, pickling and the pipe's or slot's copy take the sending core, not a NIC)."""
    receive_byte_s: float = 0.0
    """Receiver's CPU seconds per byte of a message from another machine."""
    pipe_bytes: int = 0
    """What a link holds for a receiver that is not reading (a pipe's buffer): a message
    between machines larger than this is written only as its receiving machine reads, which
    it does between handlers, so it holds its sender's outgoing link (and every later
    message on it) until the handler running there ends. The processes runtime: a worker
    reads its pipes between handlers and its one writer thread sends in order. 0: no limit
    (a network's buffers)."""
    processes: int = 0
    """Model the processes runtime's process structure with this many worker processes
    (0: none, each machine's actors share its cores freely). Actors are grouped into
    processes as the processes runtime places them (``processes.place``: a replica per worker,
    or its stages dealt round-robin), those without a number (the master, the coordinator)
    and those spawned once the run started in the driver's process (process 0); each process
    handles one message at a time, and process p runs on machine p % machines, sharing its
    cores with the others there (1 machine of 2 cores: the driver's process and two workers
    on two cores). The network's ends are then the processes (a link per process: its pipes
    and its one writer thread), and a sleep in a handler (``slow_replicas``, a planned
    ``delay``) holds its process but frees its core. ``placement`` must stay a strategy."""
    driver_message_s: float = 0.0
    """With ``processes``: the driver's process's CPU per message it sends to or receives
    from another process beyond ``send_s`` / ``receive_s`` (its run loop shares the process
    with the driver's own thread), in seconds."""
    loop_s: float = 0.0
    """With ``processes``: a process's run loop's CPU per message it handles, beyond the
    handler (picking the next one, looking at its pipes), in seconds (modelled and
    measured)."""
    lock_handoff_s: float = 0.0
    """With ``processes`` and ``shared``: how long a process blocked on a shared actor's lock
    takes to get it once it is released (the operating system waking it), in seconds. Until
    then the lock is free, and a process that asks for it first takes it (the releasing one,
    for its next message to the same actor, most often); the woken process then waits for
    the next release. 0: a released lock goes at once to the process that waited longest."""
    lock_wake_s: float = 0.0
    """With ``processes`` and ``shared``: how long the process releasing a shared actor's lock
    that another process is blocked on takes to wake it (its release's system call; in a
    virtual machine, an interrupt to the sleeping core), in seconds: it runs nothing else
    meanwhile. A release nobody waits for costs nothing."""
    lock_handoff_jitter: float = 0.0
    """Each handoff's ``lock_handoff_s`` times a factor drawn uniformly from
    [1 - lock_handoff_jitter, 1 + lock_handoff_jitter] (seeded by the run's seed): how long a
    woken process takes varies widely (from a few to a hundred and more microseconds)."""
    faults: Any = None
    """A fault plan (:mod:`.faults`): kills fire at their count, at that virtual moment;
    delays add virtual time to each message the actor handles (no real sleep)."""
    max_restarts: int = 5
    """Restarts allowed per actor."""
    tap: Tap | None = None
    """Sees every message the run sends, as it arrives (see :data:`Tap`)."""

    def __post_init__(self) -> None:
        machines = self.machines
        if not isinstance(machines, int) or isinstance(machines, bool) or machines < 1:
            raise ConfigError(
                f"runtime_options: machines must be a whole number >= 1, got {machines!r}"
            )
        cores = self.cores
        if not isinstance(cores, int) or isinstance(cores, bool) or cores < 1:
            raise ConfigError(
                f"runtime_options: cores must be a whole number >= 1 per machine, got {cores!r}"
            )
        if self.speeds is not None:
            if isinstance(self.speeds, (str, bytes)) or not hasattr(self.speeds, "__len__"):
                raise ConfigError(
                    f"runtime_options: speeds must be a list of numbers, got {self.speeds!r}"
                )
            if len(self.speeds) != machines:
                raise ConfigError(
                    f"runtime_options: speeds must give one speed per machine ({machines}), "
                    f"got {len(self.speeds)}"
                )
            for i, speed in enumerate(self.speeds):
                _positive(f"speeds[{i}]", speed)
            object.__setattr__(self, "speeds", tuple(float(v) for v in self.speeds))
        if isinstance(self.placement, Mapping):
            for name, machine in self.placement.items():
                ok = isinstance(machine, int) and not isinstance(machine, bool)
                if not isinstance(name, str) or not ok or not 0 <= machine < machines:
                    raise ConfigError(
                        f"runtime_options: placement: {name!r} must map to a machine index "
                        f"0..{machines - 1}, got {machine!r}"
                    )
            object.__setattr__(self, "placement", dict(self.placement))
        elif self.placement not in STRATEGIES:
            raise ConfigError(
                f"runtime_options: placement must be one of {', '.join(STRATEGIES)} or "
                f"{{actor name: machine index}}, got {self.placement!r}"
            )
        if self.compute not in COMPUTE:
            raise ConfigError(
                f"runtime_options: compute must be one of {', '.join(COMPUTE)}, "
                f"got {self.compute!r}"
            )
        _positive("core_flops", self.core_flops)
        _positive("bandwidth_Bps", self.bandwidth_Bps)
        pipe = self.pipe_bytes
        if not isinstance(pipe, int) or isinstance(pipe, bool) or pipe < 0:
            raise ConfigError(
                f"runtime_options: pipe_bytes must be a whole number >= 0, got {pipe!r}"
            )
        procs = self.processes
        if not isinstance(procs, int) or isinstance(procs, bool) or procs < 0:
            raise ConfigError(
                f"runtime_options: processes must be a whole number >= 0, got {procs!r}"
            )
        if procs and isinstance(self.placement, Mapping):
            raise ConfigError(
                "runtime_options: placement cannot be a map with processes > 0 (the processes "
                "runtime's own rule places the actors)"
            )
        _positive("time_scale", self.time_scale)
        if self.message_type_s is not None:
            if not isinstance(self.message_type_s, Mapping):
                raise ConfigError(
                    "runtime_options: message_type_s must map message type names to "
                    f"seconds, got {self.message_type_s!r}"
                )
            for kind, seconds in self.message_type_s.items():
                if not isinstance(kind, str):
                    raise ConfigError(
                        f"runtime_options: message_type_s: {kind!r} is not a type name"
                    )
                _positive(f"message_type_s[{kind!r}]", seconds, zero=True)
            object.__setattr__(
                self, "message_type_s", {k: float(v) for k, v in self.message_type_s.items()}
            )
        if not isinstance(self.shared, bool):
            raise ConfigError(f"runtime_options: shared must be true or false, got {self.shared!r}")
        for name in ("jitter", "lock_handoff_jitter"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ConfigError(f"runtime_options: {name} must be in [0, 1), got {value!r}")
        for name in (
            "flops_per_element", "message_s", "latency_s", "local_latency_s", "layer_s",
            "update_s", "update_flops_per_element", "send_s", "receive_s", "send_byte_s",
            "receive_byte_s", "driver_message_s", "lock_handoff_s", "loop_s",
            "lock_wake_s",
        ):  # fmt: skip
            _positive(name, getattr(self, name), zero=True)
        header = self.header_bytes
        if not isinstance(header, int) or isinstance(header, bool) or header < 0:
            raise ConfigError(
                f"runtime_options: header_bytes must be a whole number >= 0, got {header!r}"
            )
        _plan(self)
        _check_max_restarts(self.max_restarts)
        _check_tap(self.tap)


Options = LocalOptions | ProcessesOptions | RayOptions | SimulatedOptions
OPTIONS: dict[str, type[Options]] = {
    cls.runtime: cls for cls in (LocalOptions, ProcessesOptions, RayOptions, SimulatedOptions)
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


__all__ = [
    "OPTIONS", "LocalOptions", "Options", "ProcessesOptions", "RayOptions", "SimulatedOptions",
    "Tap", "parse",
]  # fmt: skip
