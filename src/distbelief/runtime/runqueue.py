"""The run queue the in-process runtime and each process of the processes runtime run on.

Every hosted actor has a FIFO mailbox (its :class:`Cell`); the queue repeatedly picks one
actor with mail and delivers one message to it. The pick is drawn from a seeded generator, so
an asynchronous run is reproducible bit for bit and another seed gives another interleaving.
Per-mailbox FIFO is stronger than the protocol's per-sender FIFO. Why not a thread per actor:
under the GIL, thread hand-offs alone cost ~70% of throughput on this kind of machine
(design.md section 4).

The queue also checks the fault plan (an actor whose planned fault is due dies instead of
handling the message: what that means is the runtime's, see ``die``) and turns an error of a
handler into :class:`ActorFailed` naming the actor.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ActorFailed
from . import faults as fault_plans
from .base import Actor, StopFlag, stop_signals_as_flag
from .options import Tap


class Cell:
    """One hosted actor: its mailbox, its cached handlers, its planned fault."""

    __slots__ = ("name", "actor", "mailbox", "handlers", "ready", "fault", "delivered")

    def __init__(self, name: str, actor: Actor) -> None:
        self.name = name
        self.actor = actor
        self.mailbox: deque[tuple[Any, Any]] = deque()
        self.handlers = actor.bound_handlers()
        self.ready = False  # has mail, so is in the queue's ready list
        self.fault: fault_plans.Fault | None = None  # planned death, if any
        self.delivered = 0  # messages delivered (counted only for an actor with a fault)


def handle(cell: Cell, message: Any, sender: Any) -> None:
    """Deliver ``message`` to ``cell``'s actor; an error (none of its handlers takes the message,
    or the handler raised) becomes :class:`ActorFailed` naming the actor and the message.
    ``cell`` is anything with the actor's ``name`` and ``handlers`` (a Ray host too)."""
    handler = cell.handlers.get(type(message))
    if handler is None:  # named by class, as Ray's host always did
        what = f"{type(cell.actor).__name__} has" if hasattr(cell, "actor") else "there is"
        raise ActorFailed(
            cell.name, type(message).__name__, TypeError(f"{what} no handler for this message")
        )
    try:
        handler(message, sender)
    except Exception as exc:
        raise ActorFailed(cell.name, type(message).__name__, exc) from exc


class RunQueue:
    """The cells of one process, the ready ones, and the seeded pick among them.

    ``die(cell, message)`` is called instead of delivering ``message`` when ``cell``'s planned
    fault is due (it clears ``cell.fault`` or raises); ``tap`` sees every message put into a
    mailbox (see :data:`.options.Tap`).
    """

    def __init__(
        self, seed: int | None, die: Callable[[Cell, Any], None], tap: Tap | None = None
    ) -> None:
        self.rng = random.Random(seed)
        self.cells: dict[str, Cell] = {}
        self.ready: list[Cell] = []
        self.die = die
        self.tap = tap
        self.delivered = 0
        """Messages delivered so far."""

    def enqueue(self, cell: Cell, sender: Any, message: Any) -> None:
        """Put ``message`` from ``sender`` (a ref) into ``cell``'s mailbox."""
        if self.tap is not None and self.tap(sender.name, cell.name, message) is False:
            return
        cell.mailbox.append((sender, message))
        if not cell.ready:
            cell.ready = True
            self.ready.append(cell)

    def tapped(self, sender: str, receiver: str, message: Any) -> bool:
        """Whether a message that goes to no cell (the driver's mail) gets through the tap."""
        return self.tap is None or self.tap(sender, receiver, message) is not False

    def check_targets(self, plan: tuple) -> None:
        """Refuse a fault plan that names no hosted actor or a count it never makes."""
        fault_plans.check_targets(plan, {name: cell.actor for name, cell in self.cells.items()})

    def discard(self, cell: Cell) -> None:
        """Lose what is in ``cell``'s mailbox (it was on its way to an actor that died)."""
        if cell.mailbox:
            cell.mailbox.clear()
            if cell.ready:
                self.ready.remove(cell)
                cell.ready = False

    def deliver(self, budget: int, inbox: deque, current: Any = None, slot: int = 0) -> int:
        """Deliver up to ``budget`` messages, one at a time, and stop early once nothing is
        ready or the driver's ``inbox`` has mail; returns how many were handled. ``current``
        (shared ints, optional): ``current[slot]`` holds the index of the cell being handled
        (``cell.index``), -1 between two messages, so that another process can name it."""
        ready = self.ready
        uniform = self.rng.random  # int(uniform() * n) picks in [0, n): cheaper than randrange
        done = 0
        try:
            while ready and done < budget and not inbox:
                n = len(ready)
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
                        self.die(cell, message)
                        continue
                if current is None:
                    handle(cell, message, sender)
                else:
                    current[slot] = cell.index  # type: ignore[attr-defined]
                    handle(cell, message, sender)
                    current[slot] = -1
                done += 1
        finally:
            self.delivered += done
        return done


def replies(
    run_until_reply: Callable[[float, StopFlag], None], inbox: deque, deadline: float
) -> Iterator[Any]:
    """What ``converse`` yields: the driver's mail, each time ``run_until_reply(deadline,
    stop_flag)`` has run the actors until there is some (a stop signal sets the flag)."""
    with stop_signals_as_flag() as interrupted:
        while True:
            run_until_reply(deadline, interrupted)
            while inbox:
                yield inbox.popleft()
