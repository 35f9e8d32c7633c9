"""The in-process runtime: a cooperative, single-threaded run queue (:mod:`.runqueue`). Opens
no sockets.

Every actor has a FIFO mailbox, and the loop repeatedly picks one actor with mail, by a seeded
draw, and delivers one message to it: an asynchronous run is reproducible bit for bit and
another seed gives another interleaving.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from ..errors import ActorFailed, Deadlock, RunTimeout
from . import faults as fault_plans
from .base import DRIVER, Actor, StopFlag
from .options import LocalOptions, parse
from .runqueue import Cell, RunQueue, replies
from .supervise import Supervisor

BATCH = 256
"""Messages delivered between two looks at the stop flag and the deadline (about 0.1-1 ms)."""


class _Cell(Cell):
    """One hosted actor, and what a restart needs."""

    __slots__ = ("ref", "restart_args")

    def __init__(self, name: str, actor: Actor) -> None:
        super().__init__(name, actor)
        self.ref = LocalRef(self)
        self.restart_args: tuple | None = None  # pristine constructor arguments


class LocalRef:
    """Address of an actor hosted by a LocalRuntime."""

    __slots__ = ("_cell",)

    def __init__(self, cell: _Cell | None) -> None:
        self._cell = cell

    @property
    def name(self) -> str:
        return self._cell.name if self._cell else DRIVER

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

    Options (:class:`~.options.LocalOptions`): ``faults`` is a fault plan (:mod:`.faults`; its
    delays are real sleeps here, which the whole run waits out, see there): a planned actor
    dies instead of handling the message that meets its trigger, its mailbox is lost with it,
    and, as on Ray, a ``restartable`` one is rebuilt from its constructor arguments, told its
    wiring again, and the actor the driver converses with is told ``ActorRestarted`` (at most
    ``max_restarts`` times per actor); any other death ends the run with ``ActorFailed`` naming
    it. ``tap`` sees every message the run sends (:data:`~.options.Tap`).
    """

    name = "local"
    single_threaded = True

    def __init__(self, seed: int | None = None, **options: Any) -> None:
        self.options: LocalOptions = parse("local", options)  # type: ignore[assignment]
        self._queue = RunQueue(seed, self._kill, self.options.tap)
        self._cells: dict[str, _Cell] = self._queue.cells  # type: ignore[assignment]
        self._driver_ref = LocalRef(None)
        self._driver_inbox: deque[Any] = deque()
        self._plan = self.options.faults
        self._faults = fault_plans.kills(self._plan)
        self._supervisor = Supervisor(self.options.max_restarts)
        self.restarts = self._supervisor.restarts
        """Restarts per actor name."""

    @property
    def delivered(self) -> int:
        """Messages delivered so far (for tests and benchmarks)."""
        return self._queue.delivered

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
        if cell is not None:
            self._queue.enqueue(cell, sender, message)
        elif self._queue.tapped(sender.name, DRIVER, message):
            self._driver_inbox.append(message)

    def tell(self, ref: LocalRef, message: Any) -> None:
        if self._supervisor.partner is None:  # before the run starts: its wiring
            self._supervisor.wiring(ref.name, message)
        self._post(ref, message, self._driver_ref)

    def converse(self, ref: LocalRef, message: Any, *, timeout: float) -> Iterator[Any]:
        deadline = time.monotonic() + timeout
        if self._supervisor.partner is None:
            self._queue.check_targets(self._plan)  # none that cannot fire
            self._supervisor.partner = ref
        self.tell(ref, message)
        yield from replies(self._run_until_reply, self._driver_inbox, deadline)

    def _run_until_reply(self, deadline: float, interrupted: StopFlag) -> None:
        queue, inbox = self._queue, self._driver_inbox
        while True:
            interrupted.raise_if_set()  # between two messages: every actor is whole
            # A stop during the last few messages (say, while the parameters trained so far
            # are collected) is seen before the reply is handed over, not lost with it.
            if inbox:
                return
            if time.monotonic() > deadline:
                raise RunTimeout("the run did not finish within its timeout")
            if not queue.ready:
                raise Deadlock(
                    "no actor has a message to handle, but the driver got no reply: "
                    "a message was lost or an actor is waiting for a reply that never comes"
                )
            queue.deliver(BATCH, inbox)

    def _kill(self, cell: _Cell, message: Any) -> None:
        """The planned death of ``cell``'s actor, instead of handling ``message``."""
        fault, cell.fault = cell.fault, None  # a planned fault happens once

        def refuse(why: str, count: int) -> ActorFailed:
            why = "its class is not restartable" if why == "not restartable" else why
            return ActorFailed(
                cell.name, type(message).__name__, RuntimeError(f"died ({fault}); {why}")
            )

        def respawn() -> None:
            self._queue.discard(cell)  # what was on its way to the dead actor is lost with it
            args, kwargs = copy.deepcopy(cell.restart_args)
            cell.actor = type(cell.actor)(*args, **kwargs)
            cell.actor.restarted = True  # before anything is delivered (see Actor.restarted)
            cell.actor.bind(_LocalContext(self, cell))
            cell.handlers = self._handlers(cell.name, cell.actor)

        self._supervisor.restart(
            cell.name,
            cell.ref,
            restartable=cell.restart_args is not None,
            refuse=refuse,
            respawn=respawn,
            send=lambda ref, m: self._post(ref, m, self._driver_ref),
        )

    def shutdown(self) -> None:
        self._cells.clear()
        self._queue.ready.clear()
        self._driver_inbox.clear()
