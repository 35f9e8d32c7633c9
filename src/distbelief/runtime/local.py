"""The in-process runtime: a cooperative, single-threaded run queue. Opens no sockets.

Why not a thread per actor: under the GIL, thread hand-offs alone cost ~70% of throughput on
this kind of machine (design.md section 4). Here every actor has a FIFO mailbox, and the loop
repeatedly picks one actor with mail and delivers one message to it. The pick is drawn from a
seeded generator, so an asynchronous run is reproducible bit for bit and another seed gives
another interleaving. Per-mailbox FIFO is stronger than the protocol's per-sender FIFO.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from ..errors import ActorFailed, Deadlock, RunTimeout
from .base import Actor, sigint_as_flag


class _Cell:
    """One hosted actor: its mailbox and cached handlers."""

    __slots__ = ("name", "actor", "mailbox", "handlers", "ready", "ref")

    def __init__(self, name: str, actor: Actor) -> None:
        self.name = name
        self.actor = actor
        self.mailbox: deque[tuple[Any, Any]] = deque()
        self.handlers = actor.bound_handlers()
        self.ready = False
        self.ref = LocalRef(self)


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
    """Hosts actors in this process and delivers their messages on the caller's thread."""

    single_threaded = True

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._cells: dict[str, _Cell] = {}
        self._ready: list[_Cell] = []
        self._driver_ref = LocalRef(None)
        self._driver_inbox: deque[Any] = deque()
        self.delivered = 0
        """Messages delivered so far (for tests and benchmarks)."""

    def spawn(self, name: str, cls: type[Actor], *args: Any, **kwargs: Any) -> LocalRef:
        if name in self._cells:
            raise ValueError(f"an actor named {name!r} already exists")
        actor = cls(*args, **kwargs)
        cell = _Cell(name, actor)
        actor.bind(_LocalContext(self, cell))
        self._cells[name] = cell
        return cell.ref

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
        self._post(ref, message, self._driver_ref)

    def converse(self, ref: LocalRef, message: Any, *, timeout: float) -> Iterator[Any]:
        deadline = time.monotonic() + timeout
        self.tell(ref, message)
        inbox = self._driver_inbox
        with sigint_as_flag() as interrupted:
            while True:
                self._run_until_reply(deadline, interrupted)
                while inbox:
                    yield inbox.popleft()

    def _run_until_reply(self, deadline: float, interrupted: threading.Event) -> None:
        ready = self._ready
        inbox = self._driver_inbox
        uniform = self._rng.random  # int(uniform() * n) picks in [0, n): cheaper than randrange
        delivered = 0
        if interrupted.is_set():
            raise KeyboardInterrupt
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
                    if interrupted.is_set():
                        raise KeyboardInterrupt  # between two messages: every actor is whole
                    if time.monotonic() > deadline:
                        raise RunTimeout("the run did not finish within its timeout")
        finally:
            self.delivered += delivered

    def shutdown(self) -> None:
        self._cells.clear()
        self._ready.clear()
        self._driver_inbox.clear()
