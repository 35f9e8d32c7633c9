"""The in-process runtime: seeded interleaving, errors named, no hangs."""

from __future__ import annotations

import pytest

from distbelief.errors import ActorFailed, ConfigError, Deadlock
from distbelief.runtime import Actor, LocalRuntime, make_runtime, receives
from distbelief.runtime.faults import Fault
from distbelief.runtime.options import LocalOptions, ProcessesOptions, RayOptions, parse


class Ping:
    pass


class Echo(Actor):
    """Logs its name `times` times (pinging itself), then tells whoever asked "done"."""

    def __init__(self, log: list[str], times: int = 3) -> None:
        self.log = log
        self.times = times

    @receives(Ping)
    def on_ping(self, msg: Ping, sender: object) -> None:
        if sender is not self.ctx.self_ref:
            self.asker = sender
        self.log.append(self.ctx.name)
        self.times -= 1
        if self.times:
            self.ctx.tell(self.ctx.self_ref, Ping())
        else:
            self.ctx.tell(self.asker, "done")


class Collector(Actor):
    """Pings every echo actor and replies to the driver once all are done."""

    def __init__(self, echoes: list) -> None:
        self.echoes = echoes
        self.waiting = len(echoes)

    @receives(Ping)
    def on_ping(self, msg: Ping, sender: object) -> None:
        self.driver = sender
        for ref in self.echoes:
            self.ctx.tell(ref, Ping())

    @receives(str)
    def on_done(self, msg: str, sender: object) -> None:
        self.waiting -= 1
        if not self.waiting:
            self.ctx.tell(self.driver, "all done")


def interleaving(seed: int) -> list[str]:
    rt = LocalRuntime(seed)
    log: list[str] = []
    echoes = [rt.spawn(f"echo{i}", Echo, log, 5) for i in range(4)]
    collector = rt.spawn("collector", Collector, echoes)
    assert next(iter(rt.converse(collector, Ping(), timeout=10))) == "all done"
    rt.shutdown()
    return log


def test_seeded_interleaving_is_reproducible_and_seed_dependent():
    a = interleaving(1)
    assert sorted(a) == sorted(f"echo{i}" for i in range(4) for _ in range(5))
    assert a == interleaving(1)
    assert any(interleaving(s) != a for s in range(2, 6))


class Boom(Actor):
    @receives(Ping)
    def on_ping(self, msg: Ping, sender: object) -> None:
        raise ValueError("kaboom")


def test_actor_exception_ends_the_run_with_the_actor_name():
    rt = LocalRuntime(0)
    ref = rt.spawn("replica3.stage1", Boom)
    with pytest.raises(ActorFailed, match=r"replica3\.stage1.*Ping.*kaboom") as info:
        next(iter(rt.converse(ref, Ping(), timeout=10)))
    assert isinstance(info.value.cause, ValueError)


def test_unhandled_message_type_is_an_error_not_a_silent_drop():
    rt = LocalRuntime(0)
    ref = rt.spawn("boom", Boom)
    with pytest.raises(ActorFailed, match="no handler"):
        next(iter(rt.converse(ref, 42, timeout=10)))


class Silent(Actor):
    @receives(Ping)
    def on_ping(self, msg: Ping, sender: object) -> None:
        pass  # never replies


def test_a_reply_that_never_comes_is_a_deadlock_error_not_a_hang():
    rt = LocalRuntime(0)
    ref = rt.spawn("silent", Silent)
    with pytest.raises(Deadlock):
        next(iter(rt.converse(ref, Ping(), timeout=10)))


def test_duplicate_actor_names_and_unknown_runtimes_are_rejected():
    rt = LocalRuntime(0)
    rt.spawn("a", Silent)
    with pytest.raises(ValueError, match="'a' already exists"):
        rt.spawn("a", Silent)
    with pytest.raises(ConfigError, match="^runtime: unknown runtime 'mpi'"):
        make_runtime("mpi")


def test_a_tap_sees_every_message_with_its_sender_and_receiver():
    seen: list[tuple[str, str, object]] = []
    rt = LocalRuntime(0, tap=lambda sender, receiver, message: seen.append((sender, receiver)))
    echoes = [rt.spawn(f"echo{i}", Echo, [], 2) for i in range(2)]
    collector = rt.spawn("collector", Collector, echoes)
    assert next(iter(rt.converse(collector, Ping(), timeout=10))) == "all done"
    assert seen[0] == ("driver", "collector") and seen[-1] == ("collector", "driver")
    for i in range(2):  # asked, pings itself once, says done
        assert seen.count(("collector", f"echo{i}")) == 1
        assert seen.count((f"echo{i}", f"echo{i}")) == 1
        assert seen.count((f"echo{i}", "collector")) == 1
    assert len(seen) == 8 == rt.delivered + 1  # every message delivered, and the reply


def test_a_tap_that_returns_false_loses_the_message():
    rt = LocalRuntime(0, tap=lambda sender, receiver, message: receiver != "echo1")
    echoes = [rt.spawn(f"echo{i}", Echo, [], 2) for i in range(2)]
    collector = rt.spawn("collector", Collector, echoes)
    with pytest.raises(Deadlock):
        next(iter(rt.converse(collector, Ping(), timeout=10)))


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("local", {"adress": "x"}, r"unknown option\(s\) \['adress'\] for the local runtime; "
         "it takes faults, max_restarts, tap$"),
        ("local", {"max_restarts": -1}, "max_restarts must be >= 0, got -1$"),
        ("local", {"tap": "print"}, "tap must be a function"),
        ("processes", {"max_restarts": "2"}, "max_restarts must be >= 0, got '2'$"),
        ("processes", {"threads_per_process": -1}, "threads_per_process must be an integer >= 0"),
    ],
)  # fmt: skip
def test_bad_options_are_config_errors_naming_the_option(name, options, match):
    with pytest.raises(ConfigError, match=f"^runtime_options: {match}"):
        make_runtime(name, seed=0, **options)


def test_options_are_typed_per_runtime():
    rt = make_runtime("local", seed=0, faults=["kill:a@message=2"], max_restarts=2)
    assert isinstance(rt.options, LocalOptions) and rt.options.max_restarts == 2
    assert rt.options.faults == (Fault("a", "message", 2),)  # the plan, parsed
    assert parse("processes", {}) == ProcessesOptions()
    assert parse("ray", {"max_restarts": 0}) == RayOptions(max_restarts=0)
