"""Restart and replay, as every runtime that supervises its actors (``local``, ``processes``,
``ray``) does it.

An actor that dies is respawned from its constructor arguments if its class is ``restartable``
and it has restarts left (``max_restarts`` per actor); what the driver told it before the run
started (its wiring) is told again, and the actor the driver converses with (the *partner*, the
master) is told :class:`~.base.ActorRestarted`. Any other death ends the run with
:class:`ActorFailed`. How an actor is respawned and how a message reaches it are the runtime's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ActorFailed
from .base import ActorRestarted


class Supervisor:
    """The restart policy and bookkeeping of one run: restarts per actor, each actor's wiring,
    and the partner to tell of a restart."""

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.restarts: dict[str, int] = {}
        """Restarts per actor name."""
        self.told: dict[str, list[Any]] = {}
        self.partner: Any = None
        """The ref of the actor the driver converses with (None before the run starts)."""

    def wiring(self, name: str, message: Any) -> None:
        """Remember that the driver told ``name`` this, to tell it again after a restart."""
        self.told.setdefault(name, []).append(message)

    def restart(
        self,
        name: str,
        ref: Any,
        *,
        restartable: bool,
        refuse: Callable[[str, int], ActorFailed],
        respawn: Callable[[], None],
        send: Callable[[Any, Any], None],
        settle: Callable[[], None] | None = None,
        replay_wiring: bool = True,
    ) -> None:
        """Restart the dead actor ``name`` (whose ref, the same before and after, is ``ref``).

        ``refuse(why, count)`` builds the error that ends the run when it may not restart
        (``why``: "not restartable" or "no restarts left"; ``count``: its deaths so far);
        ``respawn()`` builds its new incarnation; ``send(ref, message)`` sends from the driver;
        ``settle()``, if given, waits until the replayed wiring is handled;
        ``replay_wiring=False``: ``respawn()`` gave the new incarnation its wiring itself (a
        runtime whose new incarnation must have it before any other actor's message).
        """
        count = self.restarts.get(name, 0) + 1
        if not restartable:
            raise refuse("not restartable", count)
        if count > self.max_restarts:
            raise refuse("no restarts left", count)
        self.restarts[name] = count
        respawn()
        for message in self.told.get(name, ()) if replay_wiring else ():  # as first sent
            send(ref, message)
        if settle is not None:
            settle()
        if self.partner is not None:
            send(self.partner, ActorRestarted(name, ref))
