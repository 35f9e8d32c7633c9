"""Fault plans: which actor dies, and when. Pure: parsing, validation and the trigger test.

Every runtime takes the same plan (``runtime_options={"faults": [...]}``), so a recovery path
can be tested in one process as well as on Ray. A fault is keyed on an actor and a count the
actor itself makes visible, never on time:

- ``step=N``: the first message to the actor whose ``step`` field is ``N`` (stages, data shards);
- ``update=N``: once the actor has applied ``N`` updates (parameter shards: ``updates_applied``);
- ``message=N``: the ``N``-th message delivered to the actor (any actor, the master included).

The message that meets the trigger is dropped: the actor dies before handling it. ``kill`` is
a kill from outside (Ray: ``ray.kill``); ``exit`` a crash of the process itself (Ray:
``os._exit``; in one process the two are the same). Text form, as the command line takes it:
``kill:shard1@update=500``, ``exit:replica2.stage0@step=100``, ``kill:master@message=40``.

A plan may also slow actors down: ``delay:ACTOR=DURATION`` (``delay:shard0=5ms``,
``delay:replica1=0.2s``; units ``us``, ``ms``, ``s``) makes every message the actor handles
take that much longer, from the first message to the last. ``ACTOR`` is an actor's name or a
replica's prefix (``replica1`` slows every stage of replica 1, as a slow machine would; an
exact name wins over a prefix). Every runtime sleeps in the actor's handler, before it
handles the message (on ``processes`` a shard is hosted in every process and its lock guards
its state only, so each process sleeps for the messages it hands the shard, and those sleeps
overlap: a slow link to the shard more than one slow machine). Where actors run in parallel
(processes, Ray) only that actor is slow and its senders feel it; on the in-process runtime
one thread runs every actor, so a slow actor is a slow machine the whole run shares: the run
takes longer and the seeded interleaving, hence the result, stays exactly that of the run
without the delay. (Sandblaster's ``slow_replicas`` option is the relative form of a
straggler in one thread: it skips run-queue turns.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

KINDS = ("kill", "exit")
TRIGGERS = ("step", "update", "message")
_TEXT = re.compile(r"^(?P<kind>\w+):(?P<actor>[\w.]+)@(?P<at>\w+)=(?P<count>\d+)$")
_DELAY = re.compile(r"^delay:(?P<actor>[\w.]+)=(?P<amount>\d+(?:\.\d*)?|\.\d+)(?P<unit>us|ms|s)$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_sleep = time.sleep  # what a delay calls (tests replace it)
MAX_DELAY_S = 60.0
"""Longest delay per message a plan may ask for (a longer one is a typo in the unit)."""
_LEGACY_KINDS = {"ray.kill": "kill", "exit": "exit", "kill": "kill"}


@dataclass(frozen=True)
class Fault:
    """One planned death."""

    actor: str
    """Name of the actor that dies (``shard1``, ``replica2.stage0``, ``data0``, ``master``)."""
    at: str
    """What is counted: ``step``, ``update`` or ``message`` (see the module doc)."""
    count: int
    """The count at which it dies."""
    kind: str = "kill"
    """``kill`` (from outside) or ``exit`` (the process crashes)."""

    def __str__(self) -> str:
        return f"{self.kind}:{self.actor}@{self.at}={self.count}"

    def due(self, message: Any, delivered: int, actor: Any) -> bool:
        """Whether the actor dies instead of handling ``message``, the ``delivered``-th
        message it is given (1-based)."""
        if self.at == "step":
            return getattr(message, "step", None) == self.count
        if self.at == "message":
            return delivered == self.count
        return getattr(actor, "updates_applied", 0) >= self.count


@dataclass(frozen=True)
class Delay:
    """One planned slow actor: every message it handles takes ``seconds`` longer."""

    actor: str
    """An actor's name, or a replica's prefix (``replica1``: each of its stages)."""
    seconds: float
    """Added to the handling of each message, in seconds."""

    def __str__(self) -> str:
        return f"delay:{self.actor}={self.seconds * 1e3:g}ms"

    def applies_to(self, name: str) -> bool:
        """Whether the actor called ``name`` is slowed by this delay."""
        return name == self.actor or name.startswith(self.actor + ".")


def parse(text: str) -> Fault | Delay:
    """A fault from its text form, e.g. ``kill:shard1@update=500`` or ``delay:shard0=5ms``."""
    text = text.strip()
    if text.startswith("delay:"):
        m = _DELAY.match(text)
        if m is None:
            raise ConfigError(
                f"faults: {text!r} is not delay:ACTOR=DURATION with a unit us, ms or s, "
                "e.g. delay:shard0=5ms, delay:replica1=0.2s"
            )
        seconds = float(m["amount"]) * _UNITS[m["unit"]]
        if not 0 < seconds <= MAX_DELAY_S:
            raise ConfigError(
                f"faults: {text!r}: a delay must be more than 0 and at most {MAX_DELAY_S:g} s"
            )
        return Delay(m["actor"], seconds)
    m = _TEXT.match(text)
    if m is None:
        raise ConfigError(
            f"faults: {text!r} is not KIND:ACTOR@COUNTER=N, e.g. kill:shard1@update=500, "
            "exit:replica2.stage0@step=100, kill:master@message=40 (or delay:ACTOR=DURATION, "
            "e.g. delay:shard0=5ms)"
        )
    return _checked(m["actor"], m["at"], int(m["count"]), m["kind"], text)


def plan(faults: Any) -> tuple[Fault | Delay, ...]:
    """Normalise a fault plan: ``None``, an iterable of ``Fault``, ``Delay`` or text, or the
    older mapping ``{actor: step}`` / ``{actor: (step, "ray.kill" | "exit")}``. Two deaths, or
    two delays, for one actor are refused (each actor dies at most once per plan)."""
    if faults is None:
        return ()
    out: list[Fault | Delay] = []
    if isinstance(faults, Mapping):
        for actor, spec in faults.items():
            step, kind = (spec, "kill") if isinstance(spec, int) else _pair(actor, spec)
            if kind not in _LEGACY_KINDS:
                raise ConfigError(
                    f"faults: {actor!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}"
                )
            out.append(_checked(str(actor), "step", step, _LEGACY_KINDS[kind], repr(spec)))
    elif isinstance(faults, Iterable) and not isinstance(faults, (str, bytes)):
        for item in faults:
            out.append(item if isinstance(item, (Fault, Delay)) else parse(str(item)))
    else:
        raise ConfigError(f"faults: expected a list of faults, got {type(faults).__name__}")
    for kind, what in ((Fault, "fault"), (Delay, "delay")):
        names = [f.actor for f in out if isinstance(f, kind)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"faults: more than one {what} for {', '.join(twice)}")
    return tuple(out)


def kills(items: Iterable[Fault | Delay]) -> dict[str, Fault]:
    """The planned deaths of a plan, by actor name."""
    return {f.actor: f for f in items if isinstance(f, Fault)}


def delays(items: Iterable[Fault | Delay]) -> tuple[Delay, ...]:
    """The planned delays of a plan."""
    return tuple(f for f in items if isinstance(f, Delay))


def delay_of(items: Iterable[Fault | Delay], name: str) -> float:
    """Seconds added to each message the actor called ``name`` handles (0: none); a delay
    naming the actor exactly wins over one naming its replica."""
    best: Delay | None = None
    for d in delays(items):
        if d.applies_to(name) and (best is None or len(d.actor) > len(best.actor)):
            best = d
    return best.seconds if best is not None else 0.0


def slowed(
    handlers: dict[type, Callable[[Any, Any], None]],
    seconds: float,
    sleep: Callable[[float], None] | None = None,
) -> dict[type, Callable[[Any, Any], None]]:
    """An actor's bound handlers, each taking ``seconds`` longer (``sleep``, by default
    ``time.sleep``, before it handles the message); the handlers themselves when ``seconds``
    is 0. Wrapping the handlers keeps the runtimes' delivery loops free of any test for
    delays."""
    if seconds <= 0:
        return handlers
    pause = sleep or _sleep

    def slow(handler: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        def handle(message: Any, sender: Any) -> None:
            pause(seconds)
            handler(message, sender)

        return handle

    return {t: slow(h) for t, h in handlers.items()}


def check_targets(faults: Iterable[Fault | Delay], actors: Mapping[str, Any]) -> None:
    """Refuse a plan that can never fire: an actor that was not spawned (a typo), a delay
    that slows no actor, or an ``update`` count on an actor that applies no updates.
    ``actors`` maps each spawned name to its actor object (or its class, where the object
    lives elsewhere)."""
    for fault in faults:
        if isinstance(fault, Delay):
            if not any(fault.applies_to(name) for name in actors):
                raise ConfigError(f"faults: {fault} slows no actor of this run ({_known(actors)})")
            continue
        if fault.actor not in actors:
            raise ConfigError(f"faults: {fault} names no actor of this run ({_known(actors)})")
        target = actors[fault.actor]
        if fault.at == "update" and not hasattr(target, "updates_applied"):
            raise ConfigError(
                f"faults: {fault}: {fault.actor} applies no updates (only parameter shards "
                "count them); use step= or message="
            )


def check_reachable(faults: Iterable[Fault | Delay], most: Mapping[str, Mapping[str, int]]) -> None:
    """Refuse a fault whose count this run never reaches: ``most[actor][at]`` is the largest
    count the actor reaches when no fault redoes work (e.g. ``{"replica0.stage1": {"step":
    467}, "shard1": {"update": 1868}}``); a fault on an actor or counter not in ``most`` is not
    judged here."""
    for fault in faults:
        if isinstance(fault, Delay):
            continue
        limit = most.get(fault.actor, {}).get(fault.at)
        if limit is not None and fault.count > limit:
            what = {"step": "its last step is", "update": "it applies at most"}.get(
                fault.at, f"its {fault.at} count reaches at most"
            )
            raise ConfigError(
                f"faults: {fault} can never fire: {what} {limit:,}"
                + (" updates" if fault.at == "update" else "")
                + " in this run"
            )


def _known(actors: Mapping[str, Any]) -> str:
    return "actors: " + ", ".join(sorted(actors)[:12]) + (", ..." if len(actors) > 12 else "")


def _pair(actor: object, spec: object) -> tuple[int, str]:
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec[0], spec[1]
    raise ConfigError(f"faults: {actor!r}: expected a step or (step, kind), got {spec!r}")


def _checked(actor: str, at: str, count: object, kind: str, text: str) -> Fault:
    if kind not in KINDS:
        raise ConfigError(f"faults: {text!r}: unknown kind {kind!r}; choose one of kill, exit")
    if at not in TRIGGERS:
        raise ConfigError(
            f"faults: {text!r}: unknown counter {at!r}; choose one of {', '.join(TRIGGERS)}"
        )
    if not isinstance(count, int) or isinstance(count, bool) or count < (0 if at == "step" else 1):
        raise ConfigError(f"faults: {text!r}: the count must be a whole number, got {count!r}")
    return Fault(actor, at, count, kind)
