"""The in-process runtime: a cooperative, single-threaded run queue. Opens no sockets.

Why not a thread per actor: under the GIL, thread hand-offs alone cost ~70% of throughput on
this kind of machine (design.md section 4). Here every actor has a FIFO mailbox, and the loop
repeatedly picks one actor with mail and delivers one message to it. The pick is drawn from a
seeded generator, so an asynchronous run is reproducible bit for bit and another seed gives
another interleaving. Per-mailbox FIFO is stronger than the protocol's per-sender FIFO.
"""

from __future__ import annotations

import copy
import random
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from ..errors import ActorFailed, ConfigError, Deadlock, RunTimeout
from . import faults as fault_plans
from .base import Actor, ActorRestarted, StopFlag, stop_signals_as_flag


class _Cell:
    """One hosted actor: its mailbox and cached handlers, and what a restart needs."""

    __slots__ = (
        "name", "actor", "mailbox", "handlers", "ready", "ref", "fault", "delivered", "told",
        "restart_args",
    )  # fmt: skip

    def __init__(self, name: str, actor: Actor) -> None:
        self.name = name
        self.actor = actor
        self.mailbox: deque[tuple[Any, Any]] = deque()
        self.handlers = actor.bound_handlers()
        self.ready = False
        self.ref = LocalRef(self)
        self.fault: fault_plans.Fault | None = None  # planned death, if any
        self.delivered = 0  # messages delivered (counted only for an actor with a fault)
        self.told: list[Any] = []  # what the driver told it (its wiring), replayed on restart
        self.restart_args: tuple | None = None  # pristine constructor arguments


class LocalRef:
    """Address of an actor hosted by a LocalRuntime."""

    __slots__ = ("_cell",)

    def __init__(self, cell: _Cell | None) -> None:
        self._cell = cell

    @property
    def name(self) -> str:
        return self._cell.name if self._cell else "driver"

    def __repr__(self) -> str:
        return f"LocalRef({self.name!r})"


class _LocalContext:
    __slots__ = ("name", "self_ref", "_runtime")

    def __init__(self, runtime: LocalRuntime, cell: _Cell) -> None:
        self.name = cell.name
        self.self_ref = cell.ref
        self._runtime = runtime

    def tell(self, ref: LocalRef, message: Any) -> None:
        self._runtime._post(ref, message, self.self_ref)


class LocalRuntime:
    """Hosts actors in this process and delivers their messages on the caller's thread.

    ``faults`` is a fault plan (:mod:`.faults`; its delays are real sleeps here, which the
    whole run waits out, see there): a planned actor dies instead of handling the
    message that meets its trigger, its mailbox is lost with it, and, as on Ray, a
    ``restartable`` one is rebuilt from its constructor arguments, told its wiring again, and
    the actor the driver converses with is told ``ActorRestarted`` (at most ``max_restarts``
    times per actor); any other death ends the run with ``ActorFailed`` naming it.
    """

    name = "local"
    single_threaded = True

    def __init__(
        self, seed: int | None = None, *, faults: Any = None, max_restarts: int = 5
    ) -> None:
        self._rng = random.Random(seed)
        self._cells: dict[str, _Cell] = {}
        self._ready: list[_Cell] = []
        self._driver_ref = LocalRef(None)
        self._driver_inbox: deque[Any] = deque()
        self._plan = fault_plans.plan(faults)
        self._faults = fault_plans.kills(self._plan)
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise ConfigError(f"runtime_options: max_restarts must be >= 0, got {max_restarts!r}")
        self._max_restarts = max_restarts
        self._partner: LocalRef | None = None  # the actor the driver converses with
        self.delivered = 0
        """Messages delivered so far (for tests and benchmarks)."""
        self.restarts: dict[str, int] = {}
        """Restarts per actor name."""

    def spawn(self, name: str, cls: type[Actor], *args: Any, **kwargs: Any) -> LocalRef:
        if name in self._cells:
            raise ValueError(f"an actor named {name!r} already exists")
        fault = self._faults.get(name)
        # A restart starts from the arguments as they were given (a stage binds its layers'
        # parameters to buffers of its own): keep a copy for an actor that may restart.
        pristine = copy.deepcopy((args, kwargs)) if fault and cls.restartable else None
        actor = cls(*args, **kwargs)
        cell = _Cell(name, actor)
        cell.fault, cell.restart_args = fault, pristine
        cell.handlers = self._handlers(name, actor)
        actor.bind(_LocalContext(self, cell))
        self._cells[name] = cell
        return cell.ref

    def _handlers(self, name: str, actor: Actor) -> dict[type, Any]:
        """The actor's bound handlers, slowed if the plan delays it (see :mod:`.faults`: in
        one thread a delay is a real sleep, which every actor waits out)."""
        return fault_plans.slowed(actor.bound_handlers(), fault_plans.delay_of(self._plan, name))

    def describe(self) -> dict[str, Any]:
        """What the runtime adds to a run's stats: ``restarts_by_actor`` (as Ray's)."""
        return {"restarts_by_actor": dict(self.restarts)}

    def hosted(self) -> list[str]:
        """Names of the actors this runtime hosts now (none once it is shut down)."""
        return list(self._cells)

    def queued(self) -> int:
        """Messages waiting in mailboxes now, the driver's included (for soak tests)."""
        return len(self._driver_inbox) + sum(len(c.mailbox) for c in self._cells.values())

    def actor(self, ref: LocalRef) -> Actor:
        """The hosted object behind a ref (in-process only: for tests and inspection)."""
        return ref._cell.actor

    def _post(self, ref: LocalRef, message: Any, sender: LocalRef) -> None:
        cell = ref._cell
        if cell is None:
            self._driver_inbox.append(message)
            return
        cell.mailbox.append((sender, message))
        if not cell.ready:
            cell.ready = True
            self._ready.append(cell)

    def tell(self, ref: LocalRef, message: Any) -> None:
        if self._partner is None:  # before the run starts: wiring, replayed after a restart
            ref._cell.told.append(message)
        self._post(ref, message, self._driver_ref)

    def converse(self, ref: LocalRef, message: Any, *, timeout: float) -> Iterator[Any]:
        deadline = time.monotonic() + timeout
        if self._partner is None:
            actors = {name: cell.actor for name, cell in self._cells.items()}
            fault_plans.check_targets(self._plan, actors)  # none that cannot fire
            self._partner = ref
        self.tell(ref, message)
        inbox = self._driver_inbox
        with stop_signals_as_flag() as interrupted:
            while True:
                self._run_until_reply(deadline, interrupted)
                while inbox:
                    yield inbox.popleft()

    def _run_until_reply(self, deadline: float, interrupted: StopFlag) -> None:
        ready = self._ready
        inbox = self._driver_inbox
        uniform = self._rng.random  # int(uniform() * n) picks in [0, n): cheaper than randrange
        delivered = 0
        interrupted.raise_if_set()
        if time.monotonic() > deadline:
            raise RunTimeout("the run did not finish within its timeout")
        try:
            while not inbox:
                n = len(ready)
                if n == 0:
                    raise Deadlock(
                        "no actor has a message to handle, but the driver got no reply: "
                        "a message was lost or an actor is waiting for a reply that never comes"
                    )
                i = int(uniform() * n) if n > 1 else 0
                cell = ready[i]
                mailbox = cell.mailbox
                sender, message = mailbox.popleft()
                if not mailbox:
                    # swap-remove keeps removal O(1); order in `ready` is irrelevant to the pick
                    last = ready.pop()
                    if last is not cell:
                        ready[i] = last
                    cell.ready = False
                if cell.fault is not None:
                    cell.delivered += 1
                    if cell.fault.due(message, cell.delivered, cell.actor):
                        self._kill(cell, message)
                        continue
                handler = cell.handlers.get(type(message))
                if handler is None:
                    raise ActorFailed(
                        cell.name, type(message).__name__, TypeError("no handler for this message")
                    )
                try:
                    handler(message, sender)
                except Exception as exc:
                    raise ActorFailed(cell.name, type(message).__name__, exc) from exc
                delivered += 1
                if not delivered & 255:  # about every 0.1-1 ms
                    interrupted.raise_if_set()  # between two messages: every actor is whole
                    if time.monotonic() > deadline:
                        raise RunTimeout("the run did not finish within its timeout")
            # A stop during the last few messages (say, while the parameters trained so far
            # are collected): seen before the reply is handed over, not lost with it.
            interrupted.raise_if_set()
        finally:
            self.delivered += delivered

    def _kill(self, cell: _Cell, message: Any) -> None:
        """The planned death of ``cell``'s actor, instead of handling ``message``."""
        fault, cell.fault = cell.fault, None  # a planned fault happens once
        restarts = self.restarts.get(cell.name, 0)
        if cell.restart_args is None or restarts >= self._max_restarts:
            why = (
                "its class is not restartable" if cell.restart_args is None else "no restarts left"
            )
            raise ActorFailed(
                cell.name, type(message).__name__, RuntimeError(f"died ({fault}); {why}")
            )
        self.restarts[cell.name] = restarts + 1
        if cell.mailbox:  # what was on its way to the dead actor is lost with it
            cell.mailbox.clear()
            if cell.ready:
                self._ready.remove(cell)
                cell.ready = False
        args, kwargs = copy.deepcopy(cell.restart_args)
        cell.actor = type(cell.actor)(*args, **kwargs)
        cell.actor.restarted = True  # before anything is delivered (see Actor.restarted)
        cell.actor.bind(_LocalContext(self, cell))
        cell.handlers = self._handlers(cell.name, cell.actor)
        for told in cell.told:
            self._post(cell.ref, told, self._driver_ref)
        self._post(self._partner, ActorRestarted(cell.name, cell.ref), self._driver_ref)

    def shutdown(self) -> None:
        self._cells.clear()
        self._ready.clear()
        self._driver_inbox.clear()
