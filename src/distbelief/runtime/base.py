"""The one runtime protocol: what actors may ask of a runtime, and what the driver may ask.

Actor classes are plain Python. They subclass :class:`Actor`, mark handlers with
:func:`receives`, and talk to the world only through ``self.ctx`` (a :class:`Context`). They
never import a runtime, so the in-process runtime and the Ray runtime host the same classes.

Ordering guarantee every runtime gives (and the only one actors may rely on): messages from one
sender to one receiver are delivered in the order they were sent.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from ..errors import RunStopped

F = TypeVar("F", bound=Callable[..., None])

DRIVER = "driver"
"""The driver's name as a sender and receiver, on every runtime (no actor may take it)."""


def receives(*message_types: type) -> Callable[[F], F]:
    """Mark an actor method as the handler of the given message types.

    The handler is called as ``handler(message, sender)``.
    """

    def mark(fn: F) -> F:
        fn._receives = message_types  # type: ignore[attr-defined]
        return fn

    return mark


class Context(Protocol):
    """What a runtime gives an actor."""

    name: str
    """The actor's name, unique in the run."""
    self_ref: Any
    """A ref other actors can send to."""

    def tell(self, ref: Any, message: Any) -> None:
        """Send ``message`` to ``ref`` without waiting; the sender is this actor."""


class Actor:
    """Base class of every actor. Subclasses mark handlers with :func:`receives`."""

    handlers: ClassVar[dict[type, str]] = {}
    restartable: ClassVar[bool] = False
    """Whether a runtime that supervises actors (Ray) may respawn a dead one from its
    constructor arguments; it then tells the actor the driver converses with
    ``messages.ActorRestarted``. Only actors whose lost state the run can redo say True."""
    restarted: bool = False
    """Set to True by the runtime on a respawned actor before it delivers anything to it (and
    before it asks for ``bound_handlers``): the actor knows it lost its state and may wait to
    be told it again (a parameter shard waits for ``RestoreShard``)."""
    shareable: ClassVar[bool] = False
    """Whether a runtime that runs actors in several processes of one machine (``processes``)
    may host this actor in every one of them at once. It calls :meth:`share_memory` once,
    before the processes start; then each process handles the messages sent to the actor from
    that process, so that the actor behaves as one actor with per-sender FIFO. Handlers of
    different processes run at the same time: the actor holds the lock it is given around
    every section that reads or changes shared state, and only those (work on the message
    alone, e.g. checking a pushed gradient, runs in parallel). Only actors whose every state a
    handler changes lives in tensors that ``share_memory`` moves to shared memory say True."""
    ctx: Context

    def share_memory(self, lock: AbstractContextManager[Any], hogwild: bool = False) -> None:
        """Move every state a handler changes into shared memory, and guard it with ``lock``
        from now on (see ``shareable``). ``hogwild``: the user allows the actor to leave the
        lock out where racing writes only blur numbers, never its bookkeeping."""
        raise NotImplementedError(f"{type(self).__name__} is not shareable")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = dict(getattr(cls, "handlers", {}))
        for name, fn in vars(cls).items():
            for message_type in getattr(fn, "_receives", ()):
                table[message_type] = name
        cls.handlers = table

    def bind(self, ctx: Context) -> None:
        """Called by the runtime once, before the first message is delivered."""
        self.ctx = ctx

    def bound_handlers(self) -> dict[type, Callable[[Any, Any], None]]:
        """Message type -> bound handler; runtimes cache this for fast dispatch."""
        return {t: getattr(self, name) for t, name in self.handlers.items()}

    def receive(self, message: Any, sender: Any) -> None:
        """Dispatch one message to its handler (runtimes may cache the lookup instead)."""
        try:
            name = self.handlers[type(message)]
        except KeyError:
            raise TypeError(
                f"{type(self).__name__} has no handler for {type(message).__name__}"
            ) from None
        getattr(self, name)(message, sender)


class NamedRef:
    """Address of an actor by its name alone, valid in every process of a run: the runtimes
    that host actors out of the driver's process resolve it themselves (the processes runtime
    to the actor's home process, Ray to the actor's current address, so a ref stays valid when
    its actor is respawned elsewhere). Each runtime subclasses it, so a ref says where from."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.name == self.name  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.name)

    def __reduce__(self) -> tuple:
        return type(self), (self.name,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Failure:
    """A hosted actor raised: what a runtime's host reports to the driver, which ends the run
    with ``ActorFailed``. The error travels pickled; one that does not pickle travels as its
    ``repr`` (whatever it is, the driver must hear of it)."""

    def __init__(self, actor: str, message: str, error: BaseException, trace: str) -> None:
        self.actor, self.message, self.trace = actor, message, trace
        try:
            pickle.dumps(error)
            self.error = error
        except Exception:  # noqa: BLE001 - see the class doc
            self.error = RuntimeError(repr(error))


class Runtime(Protocol):
    """Hosts actors. Implementations: ``LocalRuntime`` (in-process) and ``RayRuntime``."""

    name: str
    """The name it is created by (``make_runtime``'s) and a run records it by."""
    single_threaded: bool
    """True when all actors share one thread (evaluation then pauses training)."""

    def spawn(self, name: str, cls: type[Actor], *args: Any, **kwargs: Any) -> Any:
        """Create an actor ``cls(*args, **kwargs)`` named ``name`` and return its ref."""

    def tell(self, ref: Any, message: Any) -> None:
        """Send a message from the driver (the caller of the runtime) to an actor."""

    def converse(self, ref: Any, message: Any, *, timeout: float) -> Iterator[Any]:
        """Send ``message`` from the driver, then yield every message sent back to the driver.

        The caller stops iterating when it has the reply it wants. Raises ``RunTimeout`` when
        ``timeout`` seconds pass in all, and ``ActorFailed`` when an actor raises (or dies
        and cannot be restarted). Ctrl-C or SIGTERM raises :class:`RunStopped` between two
        messages (see :func:`stop_signals_as_flag`); the runtime can still be conversed with
        afterwards.
        """

    def shutdown(self) -> None:
        """Stop every actor of the run and release the runtime's resources."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop a run as Ctrl-C does (SIGTERM is what a service manager or ``kill``
sends)."""


class StopFlag(threading.Event):
    """Set by a stop signal during a run; ``signum`` is the signal that set it."""

    signum: int = signal.SIGINT

    def stop(self, signum: int) -> None:
        """Record the signal and set the flag (a second signal keeps the first's number)."""
        if not self.is_set():
            self.signum = signum
        self.set()

    def raise_if_set(self) -> None:
        """Raise :class:`RunStopped` if a stop signal came: call it between two messages."""
        if self.is_set():
            raise RunStopped(self.signum)


@contextlib.contextmanager
def stop_signals_as_flag() -> Iterator[StopFlag]:
    """While a run converses, Ctrl-C (SIGINT) and SIGTERM only set a flag, which the runtime
    turns into :class:`RunStopped` (a KeyboardInterrupt) between two messages: no handler is
    cut off half-way, so the actors' state stays whole and the driver can still collect the
    parameters trained so far. (A KeyboardInterrupt raised inside Ray's own calls was also seen
    to vanish there.) The previous handlers are restored on exit, so a second signal while the
    trained parameters are collected acts as it would have before the run."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers belong to the main thread; elsewhere signals are not ours
        return
    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, lambda n, frame: flag.stop(n))
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------- runtime -> master


@dataclass(frozen=True, slots=True)
class ActorRestarted:
    """Runtime -> the actor the driver converses with (the master): an actor died and was
    respawned from its constructor arguments, its wiring replayed; its state is lost."""

    name: str
    """The actor's name."""
    ref: Any
    """Its ref, the same as before the restart."""
