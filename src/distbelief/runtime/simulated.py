"""The simulated runtime: every actor runs in this process with its real arithmetic, but each
message is delivered at the moment a modelled cluster would deliver it, in virtual time.

A discrete-event loop over one heap of events keyed by (virtual time, sequence number), so that
ties are broken by the order the events were made and a run is the same bit for bit every time
(with modelled compute). Three kinds of event:

- *arrive*: a message reaches its receiver's mailbox; the actor becomes ready;
- *reach*: a message's first bit reaches the receiving machine's link (see the link model);
- *done*: a handler ends: its core is free again and what it sent leaves now.

The cluster (:class:`~.options.SimulatedOptions`): machines with a number of cores and a relative
speed; each actor placed on one (as the Ray runtime spreads them, or pinned). A ready actor
starts its oldest message (earliest arrival) when its machine has a free core; an actor handles
one message at a time. The handler runs for real at once; it occupies its core for its cost:
modelled (the FLOPs of the matrix products and convolutions it ran, counted from the shapes by
torch's FLOP formulas, plus ``flops_per_element`` per element of the message's tensors, over
``core_flops``, plus ``message_s``; all over the machine's speed) or measured (thread CPU time
times ``time_scale``, over the speed). A planned ``delay`` adds its seconds of virtual time.

Network: messages between two machines leave at the end of the handler that sent them. Each
machine has an outgoing and an incoming link of ``bandwidth_Bps`` (full duplex), each serving
one message at a time in order (FIFO): a message of ``b`` bytes (its tensors' bytes plus
``header_bytes``) occupies the sender's link for ``b / bandwidth`` from when it is free, reaches
the receiver's link ``latency_s`` after it started leaving, and occupies that link for as long,
ending no earlier than its last bit left plus the latency. Unloaded: latency + bytes/bandwidth.
A shard that many replicas push to is limited by its incoming link, as it would be. Messages
between actors of one machine, and to and from the driver, take ``local_latency_s``.

With ``processes`` (the processes runtime's model), the actors are grouped into processes by
that runtime's own placement rule; a process handles one message at a time, the processes of
a machine share its cores by processor sharing (k computing on c < k cores each go at c / k),
a sleep in a handler holds its process and no core, and the links are the processes'. As
that runtime's run loop, a process picks one of its actors with mail at random (seeded), and
a shared actor (a shard) runs under its lock: a process that picks it while another holds
it blocks, and gets it only ``lock_handoff_s`` after its release (its wake-up), unless the
releasing process (or another) takes it first.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import random
import time
import tomllib
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..core.blocks import register_block_hook
from ..errors import ConfigError, Deadlock, RunTimeout
from ..storage.runlog import set_virtual_clock
from . import faults as fault_plans
from .base import DRIVER, Actor, StopFlag
from .local import BATCH, LocalRef, LocalRuntime, _Cell
from .options import SimulatedOptions, parse
from .processes import _group, place
from .runqueue import Cell, RunQueue, handle
from .supervise import Supervisor

_ARRIVE, _REACH, _DONE, _FREE, _WAKE, _RESUME = 0, 1, 2, 3, 4, 5


def read_cluster(path: str | os.PathLike) -> dict[str, Any]:
    """The simulated runtime's options from a cluster file (TOML; its keys are the fields of
    :class:`~.options.SimulatedOptions`, ``placement`` a string or a table), checked: a file
    that cannot be read, or a bad or unknown key, is a :class:`ConfigError` naming it."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cluster: cannot read {os.fspath(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cluster: {os.fspath(path)!r} is not TOML: {exc}") from None
    try:
        parse("simulated", data)
    except ConfigError as exc:
        raise ConfigError(
            f"cluster: {os.fspath(path)}: " + str(exc).removeprefix("runtime_options: ")
        ) from None
    return data


class _FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of the matrix products and convolutions run under it, by torch's own
    formulas from the shapes: deterministic. Used once per layer kind and shape (see
    :class:`LayerFlops`), on meta tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out


_LAYER_FLOPS: dict[tuple, int] = {}
"""Forward FLOPs of a layer, by (class, its own parameters' shapes, its settings, its inputs'
shapes): a pure function of the key, so one cache serves every run."""

_measuring = False  # a layer's meta run is under way: the hooks ignore its module calls


def _shape_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_key(v) for v in value)
    return type(value).__name__


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    return value


def layer_flops(module: torch.nn.Module, inputs: tuple) -> int:
    """Forward FLOPs of ``module`` (a layer: a module without submodules) on ``inputs``: the
    matrix products and convolutions it runs, by torch's formulas, counted once per layer kind
    and shape on meta tensors (no arithmetic) and cached."""
    own = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters(recurse=False))
    key = (type(module), own, module.extra_repr(), _shape_key(inputs))
    flops = _LAYER_FLOPS.get(key)
    if flops is None:
        global _measuring
        state = {n: _to_meta(t) for n, t in module.state_dict(keep_vars=True).items()}
        counter = _FlopCounter()
        _measuring = True
        try:
            with torch.no_grad(), counter:
                torch.func.functional_call(module, state, _to_meta(inputs))
            flops = counter.flops
        except Exception:  # a layer that cannot run on meta tensors: counted as no FLOPs
            flops = 0
        finally:
            _measuring = False
        _LAYER_FLOPS[key] = flops
    return flops


_BLOCK_FLOPS: dict[tuple, int] = {}
"""Forward FLOPs of a split layer's slice run as a function (``core.blocks``), by (function,
its tensor arguments' shapes and its other arguments): a pure function of the key."""


def block_flops(fn: Any, args: tuple) -> int:
    """Forward FLOPs of ``fn(*args)`` (a partition's slice of a Linear or locally-connected
    layer, run by ``core.blocks.block_forward`` outside any module call), counted as
    :func:`layer_flops` counts a layer: once per function and shapes, on meta tensors."""
    key = (fn, tuple(_shape_key(a) if isinstance(a, torch.Tensor) else a for a in args))
    flops = _BLOCK_FLOPS.get(key)
    if flops is None:
        counter = _FlopCounter()
        try:
            with torch.no_grad(), counter:
                fn(*_to_meta(args))
            flops = counter.flops
        except Exception:  # a function that cannot run on meta tensors: counted as no FLOPs
            flops = 0
        _BLOCK_FLOPS[key] = flops
    return flops


class LayerFlops:
    """Counts the FLOPs of the layers a handler runs forward (:func:`layer_flops`), and of
    their backward when it runs (a gradient for the weights and one for the input, each as
    many FLOPs as the forward: the rule of matrix-product layers), in whichever handler runs
    it (a pipelined stage's backward comes in a later message). Only layers are counted, by a
    hook on module calls (a few per step), never each torch op: a dispatch mode over every op
    cost several times the handler's own arithmetic. One per runtime; :meth:`take` reads and
    resets the count of the handler that just ran."""

    def __init__(self) -> None:
        self.flops = 0
        self.calls = 0
        """Layer calls, forward and backward (each a Python call and autograd's bookkeeping
        beyond its FLOPs: ``layer_s`` each)."""
        self._hook: Any = None
        self._unblock: Any = None

    def __enter__(self) -> LayerFlops:
        self._hook = torch.nn.modules.module.register_module_forward_hook(self._forward)
        self._unblock = register_block_hook(self._block)  # a partition's slice of a layer
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hook.remove()
        self._unblock()

    def take(self) -> int:
        flops, self.flops = self.flops, 0
        return flops

    def take_calls(self) -> int:
        """Reads and resets the count of layer calls (forward and backward)."""
        calls, self.calls = self.calls, 0
        return calls

    def _forward(self, module: torch.nn.Module, inputs: tuple, out: Any) -> None:
        if _measuring or next(iter(module.children()), None) is not None:
            return  # a layer's meta run, or a container (its layers count themselves)
        self.calls += 1
        flops = layer_flops(module, inputs)
        self.flops += flops
        if isinstance(out, torch.Tensor) and out.requires_grad:
            weights = any(p.requires_grad for p in module.parameters(recurse=False))
            needs_input = any(isinstance(i, torch.Tensor) and i.requires_grad for i in inputs)
            backward = flops * (int(weights) + int(needs_input))
            if weights or needs_input:
                out.register_hook(lambda grad: self._add(backward))

    def _block(self, fn: Any, args: tuple, out: Any) -> None:
        """A split layer's slice run as a function (``core.blocks.block_forward``): counted
        as a layer call, its backward as the forward's FLOPs for each of the weight's and the
        input's gradients that it computes."""
        if _measuring:
            return
        self.calls += 1
        flops = block_flops(fn, args)
        self.flops += flops
        if isinstance(out, torch.Tensor) and out.requires_grad:
            x, weight = args[0], args[1]
            grads = int(weight.requires_grad) + int(x.requires_grad)
            if grads:
                out.register_hook(lambda grad: self._add(flops * grads))

    def _add(self, flops: int) -> None:
        self.flops += flops
        self.calls += 1


class _Updates:
    """Counts update-rule steps (``torch.optim`` optimizers' ``step``) and the parameter
    elements they update, by one global step hook while a simulated runtime is open (counted
    by ``watch``/``unwatch``, so the rest of the process pays nothing once the last closes): a
    handler's share is the difference across it (one thread runs every handler).
    Deterministic: counts, not times."""

    steps = 0
    elements = 0
    _hook: Any = None
    _watchers = 0

    @classmethod
    def watch(cls) -> None:
        cls._watchers += 1
        if cls._hook is None:
            cls._hook = register_optimizer_step_post_hook(cls._count)

    @classmethod
    def unwatch(cls) -> None:
        cls._watchers = max(0, cls._watchers - 1)
        if cls._watchers == 0 and cls._hook is not None:
            cls._hook.remove()
            cls._hook = None

    @classmethod
    def _count(cls, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        cls.steps += 1
        cls.elements += sum(
            p.numel() for group in optimizer.param_groups for p in group["params"]
            if p.grad is not None
        )  # fmt: skip


_FIELDS: dict[type, tuple[str, ...]] = {}
_SCALARS = frozenset({int, float, bool, str, bytes, complex, type(None)})


def tensor_size(message: Any, depth: int = 3) -> tuple[int, int]:
    """``(bytes, elements)`` of the tensors a message carries: in its fields, and in tuples,
    lists and dicts among them (``depth`` levels deep)."""
    kind = type(message)
    if kind in _SCALARS:
        return 0, 0
    if isinstance(message, torch.Tensor):
        return message.nbytes, message.numel()
    if depth == 0:
        return 0, 0
    if isinstance(message, (tuple, list)):
        items: Any = message
    elif isinstance(message, dict):
        items = message.values()
    else:
        names = _FIELDS.get(kind)
        if names is None:
            names = (
                tuple(f.name for f in dataclasses.fields(message))
                if dataclasses.is_dataclass(message) and not isinstance(message, type)
                else ()
            )
            _FIELDS[kind] = names
        if not names:
            return 0, 0
        items = [getattr(message, n, None) for n in names]
    nbytes = elements = 0
    for item in items:
        if type(item) not in _SCALARS:
            b, e = tensor_size(item, depth - 1)
            nbytes += b
            elements += e
    return nbytes, elements


def _holds_module(value: Any, depth: int) -> bool:
    """Whether ``value`` is a module or holds one in its attributes, or in the lists, tuples
    and dicts among them (``depth`` levels deep)."""
    if isinstance(value, torch.nn.Module):
        return True
    if depth == 0 or type(value) in _SCALARS or isinstance(value, (torch.Tensor, type)):
        return False
    if isinstance(value, (list, tuple)):
        items: Any = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        items = getattr(value, "__dict__", {}).values()
    return any(_holds_module(v, depth - 1) for v in items)


class _ByName(dict):
    """``message_type_s`` by message class: a class's name is looked up once, when first met."""

    def __init__(self, by_name: dict[str, float], default: float) -> None:
        super().__init__()
        self._names, self._default = by_name, default

    def __missing__(self, kind: type) -> float:
        seconds = self[kind] = self._names.get(kind.__name__, self._default)
        return seconds


class _VirtualQueue(RunQueue):
    """The run queue's cells, tap and fault check, with mailboxes whose messages carry their
    arrival key (virtual time, sequence); the pick is the simulated runtime's."""

    def discard(self, cell: Cell) -> None:
        cell.mailbox.clear()  # its ready-heap entries go stale (see _dispatch)
        cell.ready = False


class SimulatedRuntime(LocalRuntime):
    """Hosts actors in this process and delivers their messages in virtual time, on a modelled
    cluster (:class:`~.options.SimulatedOptions`; the module doc gives the model).

    ``now`` is the virtual clock (seconds since the run began); :meth:`describe` adds the
    virtual results to a run's stats. A planned kill fires as on ``local`` (the actor dies
    instead of handling the message that meets its count, at that virtual moment; a
    restartable one is respawned); a planned delay is virtual time, never a real sleep.
    """

    name = "simulated"
    single_threaded = True

    def __init__(self, seed: int | None = None, **options: Any) -> None:
        self.options: SimulatedOptions = parse("simulated", options)  # type: ignore[assignment]
        o = self.options
        self._queue = _VirtualQueue(seed, self._kill, o.tap)
        self._cells: dict[str, _Cell] = self._queue.cells  # type: ignore[assignment]
        self._driver_ref = LocalRef(None)
        self._driver_inbox: deque[Any] = deque()
        self._plan = o.faults
        self._faults = fault_plans.kills(self._plan)
        self._supervisor = Supervisor(o.max_restarts)
        self.restarts = self._supervisor.restarts
        self.now = 0.0
        """The virtual clock: seconds of the modelled cluster since the run began."""
        self._events: list[tuple] = []
        self._seq = 0
        n = o.machines
        self._speed = list(o.speeds) if o.speeds is not None else [1.0] * n
        self._free = [o.cores] * n  # free cores per machine
        # The nodes: the network's ends, each with its ready heap. Without ``processes`` a
        # node is a machine (its actors share its cores freely); with them, a process (0: the
        # driver's, 1..N the workers) on machine p % machines, one handler at a time.
        self._procs = o.processes
        nodes = n if not self._procs else self._procs + 1
        self._host = [m % n for m in range(nodes)]  # node -> machine
        self._on_machine = [[p for p in range(nodes) if self._host[p] == m] for m in range(n)]
        self._idle = [1] * nodes  # processes: free handler slots per node
        self._computing: list[dict[int, list]] = [{} for _ in range(n)]  # processes, per machine
        self._since = [0.0] * n  # processes: when each machine's shares were last advanced
        self._token = 0
        self._grouped: list[str] = []  # processes: grouped actors spawned before the run
        self._ready: list[list[tuple]] = [[] for _ in range(nodes)]  # per node: (t, seq, cell)
        self._machine: dict[str, int] = {}  # actor -> node (its machine, or its process)
        self._keys: dict[str, deque[tuple[float, int]]] = {}  # arrival keys of each mailbox
        self._delay: dict[str, float] = {}
        self._busy_actor: dict[str, float] = {}  # seconds each actor handled messages
        self._running: set[str] = set()
        self._core_s = [0.0] * n  # core-seconds used per machine
        self._out_free = [0.0] * nodes  # when each node's outgoing link is next free
        self._busy_until = [0.0] * nodes  # when the handler started last on each node ends
        self._in_free = [0.0] * nodes
        self._out_busy = [0.0] * nodes
        self._in_busy = [0.0] * nodes
        self._outbox: list[tuple[LocalRef, Any]] | None = None  # sends of the running handler
        self._sender: str | None = None
        self._examples: int | None = None  # of the last message to the driver that has them
        # training's virtual span: the start of the first handler that ran layers or an update
        # rule, the end of the last
        self._span = [float("inf"), 0.0]
        self._eval_s: list[float] = []
        self._pins: dict[str, int] = {}
        self._used_pins: set[str] = set()
        self._checked = False
        self._layers = LayerFlops()
        self._groups: dict[str, int] = {}  # placement: each group's number
        self._lone = 0  # placement: actors without a group placed so far
        self._layered: dict[str, tuple[Actor, bool]] = {}
        self._shared: set[str] = set()  # actors handled on their sender's machine
        self._slow_asked: dict[str, float] = {}  # slow_down(): by actor or replica prefix
        self._slow: dict[str, float] = {}  # each spawned actor's factor, if slowed
        self.handler_stats: dict[tuple[str, str], list[float]] | None = None
        """None, or (set it to {}) per (actor, message type): [messages, cost, layer FLOPs,
        layer calls, update steps, updated elements, message elements, cost squared] summed
        (before ``jitter``; FLOPs and
        calls are counted in modelled compute only): what calibration fits the cost terms
        from."""
        _Updates.watch()
        self._watching = True
        self._jitter = random.Random(seed)  # seeded: the same seed, the same virtual times
        # message_type_s by class (filled as classes are met: a name looked up once each)
        self._by_type: _ByName | None = None
        if o.message_type_s:
            self._by_type = _ByName(o.message_type_s, o.message_s)
        # processes: each process's pick among its actors with mail, seeded (its own stream)
        self._pick = random.Random(None if seed is None else f"pick {seed}")
        self._wakes = random.Random(None if seed is None else f"wake {seed}")  # lock handoffs
        self._by_node: dict[int, list[str]] | None = None  # processes: actors of each process
        self._holder: dict[str, int | None] = {}  # processes: the process holding a lock
        self._waiters: dict[str, deque[tuple[int, tuple]]] = {}  # ... and those blocked on it
        self._lock_wait = [0.0] * nodes  # processes: seconds each process was blocked on one

    # ---------------------------------------------------------------- actors

    def spawn(self, name: str, cls: type[Actor], *args: Any, **kwargs: Any) -> LocalRef:
        ref = super().spawn(name, cls, *args, **kwargs)
        self._keys[name] = deque()
        self._busy_actor[name] = 0.0
        self._delay[name] = fault_plans.delay_of(self._plan, name)
        slow = self._slow_asked.get(name, self._slow_asked.get(name.partition(".")[0], 1.0))
        if slow != 1.0:
            self._slow[name] = slow
        self._machine[name] = self._place(name, cls.shareable)
        if self.options.shared and cls.shareable:
            self._shared.add(name)
        self._by_node = None
        return ref

    def slow_down(self, name: str, factor: float) -> None:
        """The actor called ``name`` (or every actor of that replica prefix: its partitions),
        spawned after this, computes ``factor`` times as slowly: its handlers' layer terms
        (their FLOPs and layer calls; measured: the CPU of handlers that ran layers) take
        ``factor`` times as long in virtual time. Sandblaster's ``slow_replicas`` (elsewhere a
        sleep of ``factor - 1`` times each portion's compute) uses it: the run queue's turns
        it falls back to in one thread would cost no virtual time."""
        self._slow_asked[name] = float(factor)

    def _place(self, name: str, shareable: bool = False) -> int:
        """The machine of a new actor: pinned by the placement map (its name, else its
        replica's prefix), else by the Ray runtime's rule (``ray.placement.plan_placement``)
        over machines m0, m1, ...: members of group g (``replica3.stage1``: group replica3,
        numbered in order of first appearance) on machines (g + member) % N, every other actor
        round-robin in spawn order. Kept incrementally here: 2,000 replicas' actors asked
        the planner, with every actor placed before, in quadratic time."""
        if name in self._machine:
            return self._machine[name]  # respawned: where it was
        if self._procs:
            # The processes runtime: grouped actors get their worker when the run starts
            # (_assign_processes); the others, and any spawned later, the driver's process.
            # A shareable actor is in every process (placed by none: the processes runtime's
            # shared actors; here its messages are handled in their sender's, if ``shared``).
            if not self._checked and not shareable and _group(name) is not None:
                self._grouped.append(name)
            return 0
        group, dot, member = name.rpartition(".")
        machines = self.options.machines
        if dot:
            g = self._groups.setdefault(group, len(self._groups))
            digits = "".join(c for c in member if c.isdigit())
            spread = (g + (int(digits) if digits else 0)) % machines
        else:
            spread = self._lone % machines
            self._lone += 1
        placement = self.options.placement
        if isinstance(placement, dict):
            key = name if name in placement else name.rpartition(".")[0]
            if key in placement:
                self._used_pins.add(key)
                return placement[key]
            return spread
        return 0 if placement == "pack" else spread

    def _handlers(self, name: str, actor: Actor) -> dict[type, Any]:
        return actor.bound_handlers()  # a planned delay is virtual time here (see _start)

    def _kill(self, cell: _Cell, message: Any) -> None:
        super()._kill(cell, message)  # respawned (its context posts through self._post)
        self._keys[cell.name].clear()  # its mail was lost with it
        if cell.name in self._holder:  # processes: a shared actor's lock, and its waiters
            self._holder[cell.name] = None
            for p, _ in self._waiters.pop(cell.name, ()):
                self._idle[p] += 1  # what it waited to hand over was lost with the actor
                self._dispatch(p)

    def _assign_processes(self) -> None:
        """``processes``: the grouped actors spawned so far to their workers, by the processes
        runtime's own rule (``processes.place``), as it does when its run starts."""
        for name, worker in place(self._grouped, self._procs).items():
            self._machine[name] = worker
        self._by_node = None

    def placement(self) -> dict[str, str]:
        """Each actor's machine (``m0``, ``m1``, ...)."""
        return {name: f"m{self._host[m]}" for name, m in self._machine.items()}

    def processes(self) -> dict[str, int]:
        """``processes``: each actor's process (0: the driver's); else empty."""
        return dict(self._machine) if self._procs else {}

    # ---------------------------------------------------------------- messages

    def _schedule(self, t: float, kind: int, *payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, *payload))

    def _post(self, ref: LocalRef, message: Any, sender: LocalRef) -> None:
        if self._outbox is not None and sender.name == self._sender:
            self._outbox.append((ref, message))  # leaves when the handler ends
        else:
            self._send(ref, message, sender, self.now)

    def _send(
        self, ref: LocalRef, message: Any, sender: LocalRef, t: float, src: int | None = None
    ) -> None:
        """``message`` leaves ``sender`` (running on machine ``src``; None: its own) at virtual
        time ``t`` (the events are handled in time order, so each link sees its messages in
        the order they were sent)."""
        o = self.options
        if src is None and sender._cell is not None:
            src = self._machine.get(sender.name)
        cell = ref._cell
        dst = self._machine.get(cell.name) if cell is not None else None
        if cell is not None and cell.name in self._shared:
            # Hosted on every machine: handled where it was sent from, without the network.
            m = dst if src is None else src
            self._schedule(t + o.local_latency_s, _ARRIVE, ref, sender, message, m, False)
            return
        if src is None or dst is None or src == dst:
            self._schedule(t + o.local_latency_s, _ARRIVE, ref, sender, message, dst, False)
            return
        nbytes = tensor_size(message)[0] + o.header_bytes
        transfer = nbytes / o.bandwidth_Bps
        start = max(t, self._out_free[src])
        reach = start + o.latency_s
        if o.pipe_bytes and nbytes > o.pipe_bytes and self._busy_until[dst] > reach:
            # What the pipe cannot hold is written as the receiver reads, between its
            # handlers: not before the one running there when the message gets there ends.
            rest = (nbytes - o.pipe_bytes) / o.bandwidth_Bps
            reach = max(reach, self._busy_until[dst] + rest - transfer)
            held = reach - o.latency_s - start  # the sender's link waits, then sends
            self._out_free[src] = start + held + transfer
            self._out_busy[src] += held + transfer
        else:
            self._out_free[src] = start + transfer
            self._out_busy[src] += transfer
        self._schedule(reach, _REACH, ref, sender, message, transfer, dst)

    def _reach(self, t: float, ref: LocalRef, sender: Any, message: Any, transfer: float, dst: int):
        """The first bit reaches the receiving link at ``t`` (the last left ``transfer``
        after it started): the link takes it when free, for ``transfer``."""
        start = max(t, self._in_free[dst])
        end = start + transfer
        self._in_free[dst] = end
        self._in_busy[dst] += transfer
        self._schedule(end, _ARRIVE, ref, sender, message, dst, True)

    def _arrive(
        self,
        t: float,
        seq: int,
        ref: LocalRef,
        sender: Any,
        message: Any,
        m: int | None,
        remote: bool,
    ) -> None:
        cell = ref._cell
        if cell is None:
            if self._queue.tapped(sender.name, DRIVER, message):
                examples = getattr(message, "examples", None)
                if isinstance(examples, int):
                    self._examples = examples
                if getattr(message, "evaluation", None) is not None:
                    self._eval_s.append(t)
                self._driver_inbox.append(message)
            return
        if cell.name not in self._cells or self._cells[cell.name] is not cell:
            return  # the run was shut down
        tap = self._queue.tap
        if tap is not None and tap(sender.name, cell.name, message) is False:
            return
        cell.mailbox.append((sender, message))
        keys = self._keys[cell.name]
        if m is None or cell.name not in self._shared:
            m = self._machine[cell.name]
        keys.append((t, seq, m, remote))  # m: the machine that handles it
        if self._procs:
            self._dispatch_machine(self._host[m])
            return
        if len(keys) == 1 and cell.name not in self._running:
            heapq.heappush(self._ready[m], (t, seq, cell.name))
            self._dispatch(m)

    def _dispatch(self, m: int) -> None:
        """Start handlers on node ``m`` while it has a free core and a ready actor."""
        if self._procs:
            self._dispatch_machine(self._host[m])
            return
        ready = self._ready[m]
        while ready and self._free[m] > 0:
            t, seq, name = heapq.heappop(ready)
            keys = self._keys.get(name)
            if not keys or keys[0][:2] != (t, seq) or name in self._running:
                continue  # stale: its mail was lost with it (a restart) or it is running
            self._start(self._cells[name], m)

    def _dispatch_machine(self, machine: int) -> None:
        """``processes``: every idle process of ``machine`` with mail starts a handler (a
        process runs one at a time; the machine's cores are shared among the handlers
        computing, see :meth:`_share`). As the processes runtime's run loop does
        (``RunQueue.deliver``), it picks one of its actors with mail uniformly at random
        (seeded: the same seed, the same picks) and hands it its oldest message; a shared
        actor's messages sent from this process are its mail here (that runtime hosts it in
        every process). A process that picks a shared actor whose lock another holds blocks
        until it gets it (:meth:`_take`)."""
        for p in self._on_machine[machine]:
            if not self._idle[p]:
                continue
            mail = self._mail(p)
            if not mail:
                continue
            name, i = mail[int(self._pick.random() * len(mail))] if len(mail) > 1 else mail[0]
            self._take(p, self._cells[name], i)

    def _mail(self, p: int) -> list[tuple[str, int]]:
        """``processes``: the actors process ``p`` may pick, each with the index of the message
        it would get in its mailbox: its own actors with mail, in the order they were spawned,
        then each shared actor with a message sent from ``p`` (the oldest)."""
        if self._by_node is None:
            self._by_node = {}
            for name, node in self._machine.items():  # (in the order they were spawned)
                key = -1 if name in self._shared else node  # -1: the shared actors
                self._by_node.setdefault(key, []).append(name)
        mail = [
            (name, 0)
            for name in self._by_node.get(p, ())
            if self._keys.get(name) and name not in self._running and name in self._cells
        ]
        for name in self._by_node.get(-1, ()):
            for i, key in enumerate(self._keys[name]):
                if key[2] == p:
                    mail.append((name, i))
                    break
        return mail

    def _take(self, p: int, cell: _Cell, i: int) -> None:
        """``processes``: process ``p`` takes message ``i`` of ``cell``'s mailbox. A shared
        actor's handler runs under its lock, as on the processes runtime: if another process
        holds it, ``p`` blocks (it runs nothing else and takes no core) until the lock is
        handed to it (:meth:`_unlock`)."""
        name = cell.name
        item = self._pop(cell, i)
        if name in self._shared:
            if self._holder.get(name) is not None:
                self._idle[p] -= 1
                self._waiters.setdefault(name, deque()).append((p, item, self.now))
                return
            self._holder[name] = p
        self._start(cell, p, item)

    def _pop(self, cell: _Cell, i: int) -> tuple[Any, Any, bool]:
        """Message ``i`` of ``cell``'s mailbox, taken out: (sender, message, remote)."""
        keys = self._keys[cell.name]
        if i == 0:
            sender, message = cell.mailbox.popleft()
            return sender, message, keys.popleft()[3]
        sender, message = cell.mailbox[i]
        remote = keys[i][3]
        del cell.mailbox[i]
        del keys[i]
        return sender, message, remote

    def _unlock(self, name: str, t: float) -> bool:
        """``processes``: the shared actor ``name``'s lock is released at ``t``. The process
        blocked on it longest gets it ``lock_handoff_s`` later (the operating system wakes
        it), if nobody took it meanwhile (the releasing process, for its next message to the
        same actor, may: it is running); with ``lock_handoff_s`` 0, at once. True if a
        process was blocked on it (the releasing one then spends ``lock_wake_s`` waking it)."""
        self._holder[name] = None
        if not self._waiters.get(name):
            return False
        o = self.options
        handoff = o.lock_handoff_s
        if handoff > 0 and o.lock_handoff_jitter:
            handoff *= 1.0 + o.lock_handoff_jitter * (2.0 * self._wakes.random() - 1.0)
        if handoff > 0:
            self._schedule(t + handoff, _WAKE, name)
        else:
            self._wake(name)
        return True

    def _wake(self, name: str) -> None:
        """The process blocked longest on ``name``'s lock gets it, if it is free."""
        waiters = self._waiters.get(name)
        if not waiters or self._holder.get(name) is not None:
            return  # taken meanwhile: it waits for the next release
        p, item, since = waiters.popleft()
        self._lock_wait[p] += self.now - since
        self._holder[name] = p
        self._idle[p] += 1
        self._start(self._cells[name], p, item)

    def _start(self, cell: _Cell, m: int, item: tuple[Any, Any, bool] | None = None) -> None:
        """Hand ``cell``'s oldest message (or ``item``: (sender, message, remote), taken out
        of its mailbox already) to its actor now, on a core of machine ``m``."""
        if item is None:
            item = self._pop(cell, 0)
        sender, message, remote = item
        if cell.fault is not None:
            cell.delivered += 1
            if cell.fault.due(message, cell.delivered, cell.actor):
                self._kill(cell, message)  # at this virtual moment; no core used
                if self._procs:
                    self._dispatch(m)
                    return
                if self._keys[cell.name]:
                    t, seq, next_m, _ = self._keys[cell.name][0]
                    heapq.heappush(self._ready[next_m], (t, seq, cell.name))
                    if next_m != m:
                        self._dispatch(next_m)
                return
        o = self.options
        self._outbox, self._sender = [], cell.name
        steps, updated = _Updates.steps, _Updates.elements
        try:
            if o.compute == "modelled" and self._runs_layers(cell):
                with self._layers:
                    handle(cell, message, sender)
            elif o.compute == "modelled":
                handle(cell, message, sender)
            elif cell.name in self._slow and self._runs_layers(cell):
                t0 = time.thread_time()  # (its layer calls counted: is it a compute handler)
                with self._layers:
                    handle(cell, message, sender)
                cpu = time.thread_time() - t0
            else:
                t0 = time.thread_time()
                handle(cell, message, sender)
                cpu = time.thread_time() - t0
            flops, calls = self._layers.take(), self._layers.take_calls()
            sends = self._outbox
        finally:
            self._outbox = self._sender = None
        steps, updated = _Updates.steps - steps, _Updates.elements - updated
        working = calls > 0 or steps > 0  # training work: layers or an update rule
        if working and self.now < self._span[0]:
            self._span[0] = self.now
        nbytes, elements = tensor_size(message)
        sleep = 0.0
        if o.compute == "modelled":
            # The cost terms (docs/simulated.md, "The model"), each fitted by calibration.
            work = flops + o.flops_per_element * elements + o.update_flops_per_element * updated
            fixed = o.message_s if self._by_type is None else self._by_type[type(message)]
            cost = fixed + o.layer_s * calls + o.update_s * steps + work / o.core_flops
            slow = self._slow.get(cell.name)
            if slow is not None and calls:
                extra = (slow - 1.0) * (o.layer_s * calls + flops / o.core_flops)
                if self._procs:
                    sleep = extra  # a sleep (slow_replicas): it holds the process, not a core
                else:
                    cost += extra
        else:
            cost = cpu * o.time_scale
            slow = self._slow.get(cell.name)
            if slow is not None and calls:
                if self._procs:
                    sleep = cost * (slow - 1.0)
                else:
                    cost *= slow
        if self._procs:
            cost += o.loop_s  # the process's run loop, around the handler
        if o.send_s or o.receive_s:
            # Serialising to and from another machine's process occupies this core too.
            cost += o.receive_s * remote + o.send_s * sum(self._remote(ref, m) for ref, _ in sends)
        if self._procs and m == 0 and o.driver_message_s:
            # The driver's process: its loop costs more per message between processes.
            out = sum(self._remote(ref, m) for ref, _ in sends)
            cost += o.driver_message_s * (remote + out)
        if o.send_byte_s or o.receive_byte_s:
            # ... and copying their bytes (pickling, the pipe), per byte.
            if remote:
                cost += o.receive_byte_s * (nbytes + o.header_bytes)
            out = sum(
                tensor_size(msg)[0] + o.header_bytes for ref, msg in sends if self._remote(ref, m)
            )
            cost += o.send_byte_s * out
        if self.handler_stats is not None:
            key = (cell.name, type(message).__name__)
            row = self.handler_stats.setdefault(key, [0, 0.0, 0, 0, 0, 0, 0, 0.0])
            for i, v in enumerate((1, cost, flops, calls, steps, updated, elements, cost * cost)):
                row[i] += v
        if o.jitter:
            # Real handlers vary in length; a cluster without it keeps replicas in lockstep
            factor = 1.0 + o.jitter * (2.0 * self._jitter.random() - 1.0)
            cost *= factor
            sleep *= factor
        self._queue.delivered += 1
        if self._procs:
            # A process: its handler takes a core of its machine for its compute; a sleep
            # after it (slow_replicas, a planned delay) holds the process but frees the core.
            machine = self._host[m]
            cost = cost / self._speed[machine]
            sleep = sleep / self._speed[machine]
            self._idle[m] -= 1
            self._running.add(cell.name)
            self._core_s[machine] += cost
            self._advance(machine)
            self._token += 1
            # [node, cell, sends, work left (s on a core of its own), start, the slow-down's
            # sleep per second of its compute, version of its end event, training work]
            slowed = sleep / cost if cost > 0 else 0.0
            self._computing[machine][self._token] = [
                m, cell, sends, cost, self.now, slowed, 0, working
            ]  # fmt: skip
            self._share(machine)
            return
        cost = cost / self._speed[m] + self._delay[cell.name]
        self._free[m] -= 1
        self._running.add(cell.name)
        self._core_s[m] += cost
        self._busy_until[m] = self.now + cost
        self._busy_actor[cell.name] += cost
        if working and self.now + cost > self._span[1]:
            self._span[1] = self.now + cost
        self._schedule(self.now + cost, _DONE, cell, sends, m)

    def _advance(self, machine: int) -> None:
        """``processes``: the handlers computing on ``machine`` did their share of work since
        the last change (each at the machine's speed, over max(1, computing / cores))."""
        computing = self._computing[machine]
        elapsed = self.now - self._since[machine]
        self._since[machine] = self.now
        if computing and elapsed > 0:
            rate = min(1.0, self.options.cores / len(computing))
            for entry in computing.values():
                entry[3] -= elapsed * rate

    def _share(self, machine: int) -> None:
        """``processes``: (re)schedule the end of each handler computing on ``machine``: the
        operating system shares its cores among the runnable processes (a time slice each),
        so k of them on c < k cores each go at c / k of a core (processor sharing)."""
        computing = self._computing[machine]
        if not computing:
            return
        rate = min(1.0, self.options.cores / len(computing))
        for token, entry in computing.items():
            entry[6] += 1
            end = self.now + max(entry[3], 0.0) / rate
            self._busy_until[entry[0]] = end + (end - entry[4]) * entry[5]
            self._schedule(end, _FREE, machine, token, entry[6])

    def _computed(self, machine: int, token: int, version: int) -> None:
        """``processes``: a handler's compute ended (if ``version`` is its latest end): a sleep
        after it (``slow_replicas``: its factor less one times the compute's wall time, as
        the replica measures it; a planned delay) holds its process, not a core."""
        entry = self._computing[machine].get(token)
        if entry is None or entry[6] != version:
            return  # rescheduled since
        self._advance(machine)
        del self._computing[machine][token]
        self._share(machine)  # the others get its share
        m, cell, sends, _, start, slowed, _, working = entry
        sleep = (self.now - start) * slowed + self._delay[cell.name]
        self._busy_actor[cell.name] += self.now - start + sleep
        self._busy_until[m] = self.now + sleep
        if working and self.now + sleep > self._span[1]:
            self._span[1] = self.now + sleep
        self._schedule(self.now + sleep, _DONE, cell, sends, m)

    def _remote(self, ref: LocalRef, m: int) -> bool:
        """Whether a message from machine ``m`` to ``ref`` crosses the network."""
        cell = ref._cell
        if cell is None or cell.name in self._shared:
            return False
        return self._machine.get(cell.name, m) != m

    def _runs_layers(self, cell: _Cell) -> bool:
        """Whether ``cell``'s actor holds a module (in its attributes, or theirs), so that its
        handlers may run layers: only those are watched (a parameter shard never is)."""
        known = self._layered.get(cell.name)
        if known is not None and known[0] is cell.actor:
            return known[1]
        found = _holds_module(cell.actor, 5)
        self._layered[cell.name] = (cell.actor, found)
        return found

    def _done(self, t: float, cell: _Cell, sends: list, m: int) -> None:
        if not self._procs:
            self._free[m] += 1
        else:
            self._idle[m] += 1
        self._running.discard(cell.name)
        for ref, message in sends:
            self._send(ref, message, cell.ref, t, m)
        if self._procs:
            if self._holder.get(cell.name) == m and self._unlock(cell.name, t):
                wake = self.options.lock_wake_s
                if wake > 0:  # waking the process blocked on the lock: m runs nothing else
                    self._idle[m] -= 1
                    self._schedule(t + wake, _RESUME, m)
                    return
            self._dispatch(m)
            return
        keys = self._keys.get(cell.name)
        if keys:
            t0, seq, next_m, _ = keys[0]
            heapq.heappush(self._ready[next_m], (t0, seq, cell.name))
            if next_m != m:
                self._dispatch(next_m)
        self._dispatch(m)

    def _step(self) -> None:
        """Handle the earliest event."""
        t, seq, kind, *payload = heapq.heappop(self._events)
        self.now = t
        if kind == _ARRIVE:
            self._arrive(t, seq, *payload)
        elif kind == _REACH:
            self._reach(t, *payload)
        elif kind == _DONE:
            self._done(t, *payload)
        elif kind == _FREE:  # a process's handler ended its compute (processes)
            self._computed(*payload)
        elif kind == _WAKE:  # a process blocked on a shared actor's lock is woken (processes)
            self._wake(*payload)
        else:  # _RESUME: a process that woke another blocked on a lock goes on (processes)
            self._idle[payload[0]] += 1
            self._dispatch(payload[0])

    # ---------------------------------------------------------------- the driver

    def converse(self, ref: LocalRef, message: Any, *, timeout: float) -> Iterator[Any]:
        if not self._checked:
            self._check_placement()
            self._checked = True
            if self._procs:
                self._assign_processes()
            set_virtual_clock(lambda: self.now)  # the run log's records get virtual_s
        yield from super().converse(ref, message, timeout=timeout)

    def _check_placement(self) -> None:
        placement = self.options.placement
        if isinstance(placement, dict):
            unknown = sorted(set(placement) - self._used_pins)
            if unknown:
                known = ", ".join(sorted(self._cells)[:12]) + (
                    ", ..." if len(self._cells) > 12 else ""
                )
                raise ConfigError(
                    f"runtime_options: placement names no actor of this run: "
                    f"{', '.join(unknown)} (actors: {known})"
                )

    def _run_until_reply(self, deadline: float, interrupted: StopFlag) -> None:
        events, inbox = self._events, self._driver_inbox
        while True:
            interrupted.raise_if_set()  # between two events: every actor is whole
            if inbox:
                return
            if time.monotonic() > deadline:
                raise RunTimeout("the run did not finish within its timeout")
            if not events:
                raise Deadlock(
                    "no message is on its way and no actor is busy, but the driver got no "
                    "reply: a message was lost or an actor is waiting for a reply that never comes"
                )
            for _ in range(BATCH):
                self._step()
                if inbox or not events:
                    break

    @property
    def delivered_messages(self) -> int:
        """Messages handed to actors so far."""
        return self._queue.delivered

    def queued(self) -> int:
        """Messages waiting in mailboxes or on their way now, the driver's included."""
        blocked = sum(len(w) for w in self._waiters.values())  # processes: on a lock
        return super().queued() + blocked + sum(1 for e in self._events if e[2] < _DONE)

    # ---------------------------------------------------------------- results

    def describe(self) -> dict[str, Any]:
        """What the runtime adds to a run's stats: the virtual results. ``virtual_s`` (the
        modelled cluster's seconds until the run's end reached the driver),
        ``virtual_train_s`` (from the start of the first handler that ran layers or an update
        rule to the end of the last: training, as ``train_s`` is from the first mini-batch
        to the last push, without the run's start and end), ``virtual_examples_per_s`` (the
        examples the run reports over ``virtual_train_s``), ``virtual_eval_s`` (when each
        evaluation during training was announced), ``machine_utilisation`` (busy
        core-seconds over cores x virtual_s, per machine), ``link_utilisation`` (busy
        fraction of each machine's ``out`` and ``in`` link), ``shard_utilisation`` (busy
        fraction of each actor named shard*), ``bottleneck`` (the busiest resource: an actor,
        a machine's cores or a link, and its busy fraction) and ``placement`` (each actor's
        machine)."""
        total = self.now
        frac = (lambda busy: busy / total) if total > 0 else (lambda busy: 0.0)
        cores = self.options.cores
        machines = {f"m{m}": frac(s / cores) for m, s in enumerate(self._core_s)}
        links = {}
        end = "p" if self._procs else "m"  # processes: each process's pipes and writer
        for m in range(len(self._out_busy)):
            links[f"{end}{m}.out"] = frac(self._out_busy[m])
            links[f"{end}{m}.in"] = frac(self._in_busy[m])
        actors = {name: frac(s) for name, s in self._busy_actor.items()}
        candidates = [
            *((f"actor {n}", u) for n, u in actors.items()),
            *((f"cores of {n}", u) for n, u in machines.items()),
            *((f"link {n}", u) for n, u in links.items()),
        ]
        name, busiest = max(candidates, key=lambda c: c[1], default=("none", 0.0))
        examples = self._examples
        start, end = self._span
        train = end - start if end > start else total
        return {
            **super().describe(),
            "virtual_s": total,
            "virtual_train_s": train,
            "virtual_examples_per_s": (
                examples / train if examples is not None and train > 0 else None
            ),
            "virtual_eval_s": list(self._eval_s),
            "machine_utilisation": machines,
            "link_utilisation": links,
            "shard_utilisation": {n: u for n, u in actors.items() if n.startswith("shard")},
            "bottleneck": {"resource": name, "busy": busiest},
            "placement": self.placement(),
            **({"processes": self.processes()} if self._procs else {}),
        }

    def shutdown(self) -> None:
        set_virtual_clock(None)
        if self._watching:  # (shutdown may be called twice)
            self._watching = False
            _Updates.unwatch()
        super().shutdown()
        self._events.clear()
        for ready in self._ready:
            ready.clear()
