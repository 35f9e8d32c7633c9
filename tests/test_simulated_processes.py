"""The simulated runtime's model of the processes runtime (``processes``: actors grouped into
processes by its own placement rule, one handler at a time per process, processes sharing a
machine's cores, a sleep that frees its core), and the FLOPs of a partition's slice of a
layer (run by ``core.blocks.block_forward`` outside any module call)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from support import mlp
from torch import nn

import distbelief
from distbelief.core.flat import flatten
from distbelief.nn import LocallyConnected1d
from distbelief.runtime import make_runtime
from distbelief.runtime.base import Actor, receives
from distbelief.runtime.processes import place

MS = 1e-3


@dataclasses.dataclass(frozen=True)
class _Fan:
    targets: tuple


@dataclasses.dataclass(frozen=True)
class _Ping:
    reply_to: Any


class _Hub(Actor):
    @receives(_Fan)
    def on_fan(self, msg: _Fan, sender: Any) -> None:
        for target in msg.targets:
            self.ctx.tell(target, _Ping(sender))


class _Worker(Actor):
    def __init__(self, name: str) -> None:
        self.name = name

    @receives(_Ping)
    def on_ping(self, msg: _Ping, sender: Any) -> None:
        self.ctx.tell(msg.reply_to, self.name)


def replies(cores: int, faults: list[str] | None = None, **options: Any) -> dict[str, float]:
    """A hub (no number: the driver's process) pings w0, x0 (group 0) and w1 (group 1), on one
    machine of ``cores``, 2 worker processes, every handler 1 ms, nothing else costing: the
    virtual time each reply reached the driver."""
    rt = make_runtime(
        "simulated", seed=0, machines=1, cores=cores, processes=2, message_s=MS,
        flops_per_element=0.0, latency_s=0.0, local_latency_s=0.0, bandwidth_Bps=1e15,
        header_bytes=0, faults=faults, **options,
    )  # fmt: skip
    try:
        hub = rt.spawn("hub", _Hub)
        workers = tuple(rt.spawn(n, _Worker, n) for n in ("w0", "x0", "w1"))
        got = {}
        for name in rt.converse(hub, _Fan(workers), timeout=60):
            got[name] = rt.now
            if len(got) == 3:
                assert rt.processes() == {"hub": 0, "w0": 1, "x0": 1, "w1": 2}
                return got
        raise AssertionError("no replies")
    finally:
        rt.shutdown()


def test_a_process_handles_one_message_at_a_time_and_processes_share_the_cores():
    """Two cores: w0 (process 1) and w1 (process 2) at once after the hub's 1 ms; x0 waits for
    its process (w0's), not for a core. Without processes the machine's two cores take w0
    and x0 at once, w1 after."""
    got = replies(cores=2)
    # (which of w0 and x0 its process takes first is its seeded pick, as on processes)
    assert sorted([got["w0"], got["x0"]]) == pytest.approx([2 * MS, 3 * MS], rel=1e-12)
    assert got["w1"] == pytest.approx(2 * MS, rel=1e-12)
    # the driver's process pays driver_message_s per message to another process: the hub's 3
    slow_loop = replies(cores=2, driver_message_s=MS)
    assert sorted([slow_loop["w0"], slow_loop["x0"]]) == pytest.approx([5 * MS, 6 * MS])
    assert slow_loop["w1"] == pytest.approx(5 * MS, rel=1e-12)
    rt = make_runtime(
        "simulated", seed=0, machines=1, cores=2, message_s=MS, flops_per_element=0.0,
        local_latency_s=0.0,
    )  # fmt: skip
    try:
        hub = rt.spawn("hub", _Hub)
        workers = tuple(rt.spawn(n, _Worker, n) for n in ("w0", "x0", "w1"))
        plain = {}
        for name in rt.converse(hub, _Fan(workers), timeout=60):
            plain[name] = rt.now
            if len(plain) == 3:
                break
    finally:
        rt.shutdown()
    assert plain == pytest.approx({"w0": 2 * MS, "x0": 2 * MS, "w1": 3 * MS}, rel=1e-12)


def test_processes_share_a_core_and_a_sleep_holds_its_process_not_the_core():
    """One core: w0 and w1 compute at once at half a core each (the OS's time slices), both
    done at 3 ms; w0 then sleeps 5 ms (a planned delay, a real sleep on processes), which
    holds its process (x0 waits until 8 ms) but no core: x0 then has the core to itself."""
    got = replies(cores=1, faults=["delay:w0=5ms"])
    assert got == pytest.approx({"w1": 3 * MS, "w0": 8 * MS, "x0": 9 * MS}, rel=1e-12)
    # no sleep: x0 right after w0, at 3 ms, alone on the core
    assert replies(cores=1) == pytest.approx({"w1": 3 * MS, "w0": 3 * MS, "x0": 4 * MS})


def toy(n: int = 256):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(("replicas", "stages"), [(2, 1), (1, 2)])
def test_actors_are_placed_as_the_processes_runtime_places_them_and_repeat(replicas, stages):
    """Grouped actors go to the workers ``processes.place`` gives them (a replica per worker,
    or a replica's stages dealt over them), the master to the driver's process; the same seed
    gives the same virtual times and parameters bit for bit."""

    def once():
        model = mlp([10, 16, 16, 3])
        result = distbelief.train(
            model, toy(), loss="cross_entropy", lr=0.1, batch_size=16, epochs=1, seed=3,
            replicas=replicas, stages=stages, runtime="simulated",
            runtime_options={"machines": 1, "cores": 2, "processes": 2, "shared": True,
                             "jitter": 0.3, "lock_handoff_s": 40e-6, "lock_handoff_jitter": 0.5,
                             "lock_wake_s": 10e-6, "loop_s": 5e-6},
        )  # fmt: skip
        return result, flatten(model.children())

    (a, pa), (b, pb) = once(), once()
    procs = a.stats["processes"]
    grouped = [n for n in procs if n != "master" and not n.startswith("shard")]
    assert {n: procs[n] for n in grouped} == place(grouped, 2)
    assert procs["master"] == 0
    assert len({procs[n] for n in grouped}) == 2  # both workers used
    assert a.stats["virtual_s"] == b.stats["virtual_s"] and torch.equal(pa, pb)
    assert set(a.stats["link_utilisation"]) == {
        f"p{p}.{d}" for p in range(3) for d in ("out", "in")
    }


@dataclasses.dataclass(frozen=True)
class _Go:
    shared: Any
    uses: int


@dataclasses.dataclass(frozen=True)
class _Use:
    pass


@dataclasses.dataclass(frozen=True)
class _Used:
    pass


class _Lockable(Actor):
    """Shared (hosted in every process, as a parameter shard on processes): one use at a
    time, under its lock."""

    shareable = True

    @receives(_Use)
    def on_use(self, msg: _Use, sender: Any) -> None:
        self.ctx.tell(sender, _Used())


class _User(Actor):
    """Uses the shared actor ``uses`` times in a row, then tells the driver."""

    def __init__(self, name: str) -> None:
        self.name, self.left, self.shared, self.driver = name, 0, None, None

    @receives(_Go)
    def on_go(self, msg: _Go, sender: Any) -> None:
        self.shared, self.left, self.driver = msg.shared, msg.uses, sender
        self.ctx.tell(self.shared, _Use())

    @receives(_Used)
    def on_used(self, msg: _Used, sender: Any) -> None:
        self.left -= 1
        if self.left:
            self.ctx.tell(self.shared, _Use())
        else:
            self.ctx.tell(self.driver, self.name)


def lock_contest(**options: Any) -> dict[str, float]:
    """a0 (process 1) uses the shared actor twice, b1 (process 2) once, both asking at
    0.1 ms; a use holds its lock 1 ms, a0's answer to it takes 0.1 ms: when each finished."""
    rt = make_runtime(
        "simulated", seed=0, machines=1, cores=2, processes=2, shared=True, message_s=MS,
        message_type_s={"_Go": 0.1 * MS, "_Used": 0.1 * MS}, flops_per_element=0.0,
        latency_s=0.0, local_latency_s=0.0, header_bytes=0, **options,
    )  # fmt: skip
    try:
        shared = rt.spawn("lockable", _Lockable)
        a, b = rt.spawn("a0", _User, "a"), rt.spawn("b1", _User, "b")
        rt.tell(a, _Go(shared, 2))  # (a0's first: its process asks for the lock first)
        got = {}
        for name in rt.converse(b, _Go(shared, 1), timeout=60):
            got[name] = rt.now
            if len(got) == 2:
                assert rt.processes()["a0"] != rt.processes()["b1"]
                return got
        raise AssertionError("no replies")
    finally:
        rt.shutdown()


def test_a_process_blocked_on_a_shared_actors_lock_gets_it_only_once_woken():
    """a0's process takes the lock at 0.1 ms and b1's blocks on it. Released at 1.1 ms with
    ``lock_handoff_s`` 0.5 ms: before b1's process is woken (1.6 ms), a0's, going on, asks
    again (1.2 ms) and takes it back: a0 done at 2.3 ms, b1 only after the next release
    (2.2 + 0.5 ms): 3.8 ms. A lock handed over at once (0) serves b1 first: b1 at 2.2 ms, a0
    at 3.2. And waking b1's process costs a0's ``lock_wake_s`` (0.3 ms) at each release."""
    assert lock_contest(lock_handoff_s=0.5 * MS) == pytest.approx(
        {"a": 2.3 * MS, "b": 3.8 * MS}, rel=1e-12
    )
    assert lock_contest() == pytest.approx({"a": 3.2 * MS, "b": 2.2 * MS}, rel=1e-12)
    woke = lock_contest(lock_handoff_s=0.5 * MS, lock_wake_s=0.3 * MS)
    assert woke == pytest.approx({"a": 2.9 * MS, "b": 4.1 * MS}, rel=1e-12)
    # a run loop's cost around every handler (loop_s): a0's process handles 5 messages
    # (its Go and Used twice, its shared uses) before it is done, b1's wait shifts with it
    looped = lock_contest(lock_handoff_s=0.5 * MS, loop_s=0.01 * MS)
    assert looped["a"] == pytest.approx(2.3 * MS + 5 * 0.01 * MS, rel=1e-12)


def test_processes_with_a_placement_map_is_a_config_error():
    with pytest.raises(distbelief.ConfigError, match="processes"):
        make_runtime("simulated", processes=2, placement={"master": 0})
    with pytest.raises(distbelief.ConfigError, match="processes"):
        make_runtime("simulated", processes=-1)
    with pytest.raises(distbelief.ConfigError, match="lock_handoff_jitter"):
        make_runtime("simulated", lock_handoff_jitter=1.0)
    with pytest.raises(distbelief.ConfigError, match="lock_handoff_s"):
        make_runtime("simulated", lock_handoff_s=-1e-6)
    with pytest.raises(distbelief.ConfigError, match="message_type_s"):
        make_runtime("simulated", message_type_s={"Forward": -1.0})


# ------------------------------------------------------------------------ partitions' FLOPs


def linear_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 3))  # fmt: skip


def local_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 10)),
        LocallyConnected1d(1, 8, 3, 10, padding=1),
        nn.ReLU(),
        LocallyConnected1d(8, 4, 3, 10, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(20, 3),
    )


def layer_flops_per_step(net: nn.Module, partitions: int) -> float:
    rt = make_runtime("simulated", seed=0)
    rt.handler_stats = {}
    result = distbelief.train(
        net, toy(), loss="cross_entropy", lr=0.1, batch_size=16, epochs=1, seed=3,
        partitions=partitions, runtime=rt,
    )  # fmt: skip
    steps = result.stats["examples"] / 16
    return sum(row[2] for row in rt.handler_stats.values()) / steps


@pytest.mark.parametrize(
    ("net", "first"), [(linear_net, 2 * 16 * 10 * 64), (local_net, 2 * 16 * 10 * 8 * 3)]
)
def test_a_partitioned_layer_counts_the_flops_of_the_whole(net, first):
    """A partition's slice of a Linear or locally-connected layer runs as a function, not a
    module call: the block hook counts it, so 2 or 3 partitions count the layers' FLOPs of 1
    (forward, and backward as for layers), and one more forward of the first layer (``first``
    FLOPs per step): a partition's input strip needs a gradient (for the blocks it came
    from), which autograd computes, where a whole stage's input from the data does not."""
    whole = layer_flops_per_step(net(), 1)
    assert whole > 4 * first
    for partitions in (2, 3):
        assert layer_flops_per_step(net(), partitions) == whole + first
