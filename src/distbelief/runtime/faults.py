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
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

KINDS = ("kill", "exit")
TRIGGERS = ("step", "update", "message")
_TEXT = re.compile(r"^(?P<kind>\w+):(?P<actor>[\w.]+)@(?P<at>\w+)=(?P<count>\d+)$")
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


def parse(text: str) -> Fault:
    """A fault from its text form, e.g. ``kill:shard1@update=500``."""
    m = _TEXT.match(text.strip())
    if m is None:
        raise ConfigError(
            f"faults: {text!r} is not KIND:ACTOR@COUNTER=N, e.g. kill:shard1@update=500, "
            "exit:replica2.stage0@step=100, kill:master@message=40"
        )
    return _checked(m["actor"], m["at"], int(m["count"]), m["kind"], text)


def plan(faults: Any) -> tuple[Fault, ...]:
    """Normalise a fault plan: ``None``, an iterable of ``Fault`` or text, or the older mapping
    ``{actor: step}`` / ``{actor: (step, "ray.kill" | "exit")}``. Two faults for one actor are
    refused (each actor dies at most once per plan)."""
    if faults is None:
        return ()
    out: list[Fault] = []
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
            out.append(item if isinstance(item, Fault) else parse(str(item)))
    else:
        raise ConfigError(f"faults: expected a list of faults, got {type(faults).__name__}")
    names = [f.actor for f in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"faults: more than one fault for {', '.join(twice)}")
    return tuple(out)


def check_targets(faults: Iterable[Fault], actors: Mapping[str, Any]) -> None:
    """Refuse a plan that can never fire: an actor that was not spawned (a typo), or an
    ``update`` count on an actor that applies no updates. ``actors`` maps each spawned name to
    its actor object (or its class, where the object lives elsewhere)."""
    for fault in faults:
        if fault.actor not in actors:
            known = ", ".join(sorted(actors)[:12]) + (", ..." if len(actors) > 12 else "")
            raise ConfigError(f"faults: {fault} names no actor of this run (actors: {known})")
        target = actors[fault.actor]
        if fault.at == "update" and not hasattr(target, "updates_applied"):
            raise ConfigError(
                f"faults: {fault}: {fault.actor} applies no updates (only parameter shards "
                "count them); use step= or message="
            )


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
