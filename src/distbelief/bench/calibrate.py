"""``distbelief calibrate``: measure this machine so that the simulated runtime's predictions
start from measured numbers, and write them as a cluster file (``--cluster FILE.toml``).

What is measured (each the best of a few repeats, on one torch thread, in this process):

- ``core_flops``: the model's layers' forward and backward FLOPs (as the simulated runtime
  counts them, :func:`~distbelief.runtime.simulated.layer_flops`) over the thread CPU seconds
  they took, marginally: between the run's batch size and 8 times it
  (:func:`marginal_layer_rate`; the fixed cost per layer call is ``layer_s``);
- ``flops_per_element``: the CPU seconds per element of a tensor copy (what taking a
  message's tensors costs at least), times ``core_flops``;
- ``update_flops_per_element``: the CPU seconds per parameter element of a step of the shards'
  update rule (Adagrad), times ``core_flops`` (:func:`update_seconds_per_element`);
- ``handlers``: what Downpour's handlers cost beyond their modelled compute, split into the
  simulator's ``message_s`` (per message), ``layer_s`` (per layer call, forward or backward)
  and ``update_s`` (per update-rule step), fitted from each handler's CPU seconds in a
  2 x 2 x 2 run (:func:`handler_costs`);
- per runtime (``local``, ``processes``, ``ray`` if asked): the seconds per message of a ball
  passed back and forth between two actors (the runtime's own cost of one message, handler
  included, which does nothing), and on ``processes`` and ``ray`` the same with a large tensor
  aboard, whose extra seconds per byte give the loopback link's bandwidth.

The cluster file models one runtime on this machine (:func:`cluster_for`): ``local`` as one
machine with one core (the in-process runtime handles one message at a time), ``processes``
and ``ray`` as one machine per core whose links are the loopback's (latency: a message's
seconds between processes less the in-process cost; bandwidth: the measured one).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..models import mlp
from ..runtime import make_runtime
from ..runtime.base import Actor, receives
from ..runtime.simulated import LayerFlops

RUNTIMES = ("local", "processes", "ray")


@dataclass(frozen=True)
class Serve:
    """Driver -> server: pass a ball ``hops`` times between you and ``peer``."""

    peer: Any
    hops: int
    payload: torch.Tensor | None


@dataclass(frozen=True)
class Ball:
    left: int
    payload: torch.Tensor | None


@dataclass(frozen=True)
class Over:
    seconds: float
    cpu_s: float  # the server's process's CPU seconds over the rally (every thread)


class Player(Actor):
    """Passes the ball back; the server times the whole rally and tells the driver."""

    def __init__(self) -> None:
        self.driver: Any = None
        self.t0 = 0.0
        self.cpu0 = 0.0

    @receives(Serve)
    def on_serve(self, msg: Serve, sender: Any) -> None:
        self.driver = sender
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.ctx.tell(msg.peer, Ball(msg.hops - 1, msg.payload))

    @receives(Ball)
    def on_ball(self, msg: Ball, sender: Any) -> None:
        if msg.left == 0:
            cpu = time.process_time() - self.cpu0
            self.ctx.tell(self.driver, Over(time.perf_counter() - self.t0, cpu))
        else:
            self.ctx.tell(sender, Ball(msg.left - 1, msg.payload))


def seconds_per_message(
    runtime: str, hops: int = 400, payload_bytes: int = 0, repeats: int = 3, driver: bool = False
) -> tuple[float, float]:
    """Seconds per message of a rally of ``hops`` (even) messages between two actors on
    ``runtime`` (in two worker processes on ``processes``), each carrying ``payload_bytes``
    of tensor, the best of ``repeats`` rallies; and the CPU seconds one process spent per
    message it received and sent (its run loop, serialising, the handler) in that rally.
    ``driver`` (processes): the server in the driver's process (named without a number, as
    the master and the coordinator), the other in a worker."""
    options: dict[str, Any] = {"processes": 2} if runtime == "processes" else {}
    rt = make_runtime(runtime, seed=0, **options)
    payload = torch.zeros(payload_bytes // 4) if payload_bytes else None
    try:
        a = rt.spawn("player" if driver else "player0", Player)
        b = rt.spawn("player1", Player)
        best, cpu = float("inf"), float("inf")
        for _ in range(repeats + 1):  # the first warms up (process start, imports)
            for reply in rt.converse(a, Serve(b, hops, payload), timeout=600):
                if isinstance(reply, Over):
                    best = min(best, reply.seconds / hops)
                    # the server received and sent every other message of the rally
                    cpu = min(cpu, reply.cpu_s / (hops / 2))
                    break
        return best, cpu
    finally:
        rt.shutdown()


def pipe_buffer_bytes() -> int:
    """What a pipe between two processes holds before its writer blocks (Linux's
    ``F_GETPIPE_SZ`` of a fresh pipe, as the processes runtime's are; 65,536 where it cannot be
    asked): a larger message is written only as its reader reads."""
    import fcntl

    r, w = os.pipe()
    try:
        return int(fcntl.fcntl(w, getattr(fcntl, "F_GETPIPE_SZ", 1032)))
    except OSError:
        return 65536
    finally:
        os.close(r)
        os.close(w)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _lock_waiter(lock: Any, turn: Any, got: Any, rounds: int, busy_s: float) -> None:
    deadline = time.monotonic() + 60
    for i in range(1, rounds + 1):
        while turn.value < i:  # spinning, never idle but on the lock (see lock_handoff_seconds)
            if time.monotonic() > deadline:
                return
        _spin(busy_s)  # computing, as a replica before its push
        lock.acquire()  # blocks: the other process holds it
        got.value = time.perf_counter_ns()
        lock.release()


def lock_handoff_seconds(
    rounds: int = 200, hold_s: float = 400e-6, busy_s: float = 800e-6
) -> tuple[float, float, float]:
    """Seconds from the release of a lock across processes (the ``processes`` runtime's kind,
    a ``multiprocessing`` lock) to the moment a process blocked on it has it: the operating
    system waking that process: the median of ``rounds``, and their spread as the
    half-width of a uniform factor around it with the same 10th to 90th percentiles (at most
    0.9; the simulator's ``lock_handoff_jitter``); and the median time the release itself
    took (``lock_wake_s``: waking the blocked process). As two replicas' workers on one
    shard: one process computes for ``busy_s`` (a step's forward and backward) and then asks
    for the lock, which the other holds for ``hold_s`` more (about a shard's push) before it
    releases it and keeps its core busy (as a worker going on with its next message does);
    the blocked one notes when it got it, on the clock every process shares. Neither is ever
    idle but the one blocked on the lock, as in a run (they take turns through shared
    memory, spinning): a core that idled briefly just before may poll for work instead of
    sleeping (a virtual machine's ``haltpoll``), and wake in microseconds, which a worker
    busy between its waits for the lock does not. Meanwhile the lock is free: the releasing
    process, if it asks again first, takes it back (the simulator's ``lock_handoff_s``)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    lock = ctx.Lock()
    turn, got = ctx.RawValue("q", 0), ctx.RawValue("q", 0)
    lock.acquire()
    waiter = ctx.Process(
        target=_lock_waiter, args=(lock, turn, got, rounds, busy_s), daemon=True
    )  # fmt: skip
    waiter.start()
    seconds, releases = [], []
    try:
        deadline = time.monotonic() + 60
        for i in range(1, rounds + 1):
            got.value = 0
            turn.value = i
            _spin(busy_s + hold_s)  # the other computes, then blocks on the lock
            released = time.perf_counter_ns()
            lock.release()
            releases.append((time.perf_counter_ns() - released) * 1e-9)
            _spin(hold_s)  # busy, as a worker going on
            while not got.value and time.monotonic() < deadline:
                pass
            if not got.value:
                break
            seconds.append((got.value - released) * 1e-9)
            lock.acquire()
    finally:
        turn.value = rounds + 1
        waiter.join(timeout=10)
        if waiter.is_alive():
            waiter.kill()
    if not seconds:
        return 0.0, 0.0, 0.0
    seconds.sort()
    middle = statistics.median(seconds)
    tenth, ninetieth = seconds[len(seconds) // 10], seconds[(9 * len(seconds)) // 10]
    # a uniform factor in [1 - s, 1 + s] has its 10th and 90th percentiles at 1 -/+ 0.8 s
    spread = (ninetieth - tenth) / (1.6 * middle) if middle > 0 else 0.0
    return middle, min(spread, 0.9), statistics.median(releases)


def layer_seconds(widths: list[int], batch_size: int = 32, repeats: int = 5) -> tuple[int, float]:
    """Forward and backward of ``mlp(widths)`` on a mini-batch: its FLOPs as the simulated
    runtime counts them, and its thread CPU seconds (the best of ``repeats``)."""
    model = mlp(widths)
    x = torch.randn(batch_size, widths[0])
    y = torch.randint(0, widths[-1], (batch_size,))
    params = list(model.parameters())
    counter = LayerFlops()

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)

    with counter:
        step()
    flops = counter.take()
    best = float("inf")
    reps = 20
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(reps):
            step()
        best = min(best, (time.thread_time() - t0) / reps)
    return flops, best


def layer_rate(widths: list[int], batch_size: int = 32, repeats: int = 5) -> float:
    """FLOP/s of one core on the model's layers: forward and backward of ``mlp(widths)`` on
    a mini-batch, FLOPs as the simulated runtime counts them over thread CPU seconds."""
    flops, seconds = layer_seconds(widths, batch_size, repeats)
    return flops / seconds


def _busy_core(widths: list[int], batch_size: int, repeats: int, out: Any) -> None:
    torch.set_num_threads(1)
    out.put(layer_seconds(widths, batch_size, repeats)[1])


def busy_speed(widths: list[int], batch_size: int = 32, repeats: int = 5) -> float:
    """A core's speed while every core of the machine computes, relative to one alone: the
    model's forward and backward in one process per core at once (forked), their mean thread
    CPU seconds against one process's alone. Cores that share caches, memory bandwidth or a
    physical core (a virtual machine's) slow each other; ``processes`` and ``ray`` keep every
    core busy, so their cluster's machines get this speed."""
    import multiprocessing

    cores = os.cpu_count() or 1
    alone = layer_seconds(widths, batch_size, repeats)[1]
    if cores < 2:
        return 1.0
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    workers = [
        ctx.Process(target=_busy_core, args=(widths, batch_size, 4 * repeats, out))
        for _ in range(cores)
    ]
    for w in workers:
        w.start()
    try:
        together = [out.get(timeout=600) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=60)
    return min(alone / (sum(together) / len(together)), 1.0)


def marginal_layer_rate(widths: list[int], batch_size: int = 32, repeats: int = 5) -> float:
    """FLOP/s of one core on the model's layers, less their fixed cost per call: the extra
    FLOPs of a mini-batch 8 times bigger over its extra CPU seconds (a layer call's fixed
    cost, which does not grow with the batch, is ``layer_s``, fitted from the handlers). A
    rate at one batch size charges that fixed cost per FLOP: a Sandblaster portion of 250
    examples came out 1.7 times as long as measured."""
    small, t_small = layer_seconds(widths, batch_size, repeats)
    large, t_large = layer_seconds(widths, 8 * batch_size, repeats)
    if t_large <= t_small:
        return large / t_large
    return (large - small) / (t_large - t_small)


def copy_seconds_per_element(n: int = 100_000, repeats: int = 5) -> float:
    """Thread CPU seconds per element of copying a float32 tensor of ``n`` elements: what
    taking a message's tensors costs at least (a stage copies fetched weights in)."""
    src, dst = torch.randn(n), torch.empty(n)
    best = float("inf")
    reps = 50
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(reps):
            dst.copy_(src)
        best = min(best, (time.thread_time() - t0) / reps / n)
    return best


def update_seconds_per_element(
    rule: str = "adagrad", sizes: tuple[int, int] = (10_000, 200_000), repeats: int = 5
) -> float:
    """Thread CPU seconds per parameter element of one step of the update rule ``rule`` (a
    shard's ``torch.optim`` optimizer): the slope between a step over ``sizes[0]`` and one
    over ``sizes[1]`` elements (the fixed part is the handler fit's ``update_s``)."""
    from ..core.optim import make_update_rule

    def seconds(n: int) -> float:
        p = torch.nn.Parameter(torch.zeros(n))
        p.grad = torch.full((n,), 1e-3)
        opt = make_update_rule(rule, [p], 0.01)
        opt.step()
        best = float("inf")
        reps = 20
        for _ in range(repeats):
            t0 = time.thread_time()
            for _ in range(reps):
                opt.step()
            best = min(best, (time.thread_time() - t0) / reps)
        return best

    small, large = (seconds(n) for n in sizes)
    return max(large - small, 0.0) / (sizes[1] - sizes[0])


def _variation(row: list) -> float:
    """Coefficient of variation of a handler kind's costs, from a ``handler_stats`` row."""
    count, total, square = row[0], row[1], row[7]
    mean = total / count
    return max(square / count - mean * mean, 0.0) ** 0.5 / mean if mean > 0 else 0.0


def _fit_workload(
    widths: Sequence[int], steps: int, batch_size: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    """The run the handler costs are fitted from (in one process and on ``processes`` alike):
    random data for two epochs' worth of ``steps``, and 2 replicas x 2 stages x 2 shards of
    Adagrad."""
    g = torch.Generator().manual_seed(0)
    n = 2 * steps * batch_size
    data = (torch.randn(n, widths[0], generator=g), torch.randint(0, widths[-1], (n,), generator=g))
    args = dict(
        loss="cross_entropy", lr=0.05, batch_size=batch_size, epochs=1, optimizer="adagrad",
        seed=0, eval_every=0, replicas=2, stages=2, shards=2,
    )  # fmt: skip
    return data, args


def handler_costs(
    core_flops: float,
    flops_per_element: float,
    update_flops_per_element: float,
    widths: list[int],
    batch_size: int = 32,
    steps: int = 128,
    repeats: int = 3,
) -> dict[str, float]:
    """The per-message, per-layer-call and per-update costs of Downpour's handlers beyond
    their FLOPs: ``message_s``, ``layer_s``, ``update_s``.

    A run of 2 replicas x 2 stages x 2 shards (Adagrad), ``steps`` steps each, on the simulated
    runtime with measured compute on one core: each handler's thread CPU seconds, by (actor,
    message type), the least of ``repeats`` runs; and the same run in modelled compute for the
    features the simulator counts (layer FLOPs and calls, update steps and elements, message
    elements). What each handler kind costs beyond its modelled FLOPs is then split: the
    handlers that run neither layers nor an update rule give ``message_s`` (their mean); those
    that run layers, the rest of theirs over their layer calls (``layer_s``); those that step an
    update rule, the rest of theirs over their steps (``update_s``). Each at least 0. And
    ``jitter``: how much one kind's handlers vary in length (the median over the kinds of
    their coefficient of variation, times sqrt(3), the spread of a uniform factor: at most 0.9):
    without it, replicas of equal cost stay in lockstep and staleness comes out too low."""
    from .. import train
    from ..runtime.simulated import SimulatedRuntime

    data, args = _fit_workload(widths, steps, batch_size)
    one_core = dict(machines=1, cores=1, placement="pack", local_latency_s=0.0)

    def stats(**options: Any) -> dict:
        rt = SimulatedRuntime(0, **one_core, **options)
        rt.handler_stats = {}
        train(mlp(widths), data, runtime=rt, **args)
        return rt.handler_stats

    stats(compute="measured")  # warms up
    measured = [stats(compute="measured") for _ in range(repeats)]
    features = stats(compute="modelled", core_flops=core_flops)
    spreads = []  # each frequent handler kind's coefficient of variation (its quietest run)
    for key, row in features.items():
        if row[0] >= 32:
            spreads.append(min(_variation(m[key]) for m in measured if key in m))
    spreads.sort()
    spread = spreads[len(spreads) // 2] if spreads else 0.0

    def cpu_of(key: tuple[str, str], count: int) -> float | None:
        return min(m[key][1] for m in measured if key in m)

    fit = _fit(features, cpu_of, core_flops, flops_per_element, update_flops_per_element)
    # a uniform factor in [1 - j, 1 + j] varies by j / sqrt(3): the handlers' median spread
    return {"jitter": min(spread * 3**0.5, 0.9), **fit}


def _fit(
    features: dict[tuple[str, str], list],
    cpu_of: Any,
    core_flops: float,
    flops_per_element: float,
    update_flops_per_element: float,
) -> dict[str, Any]:
    """``message_s``, ``layer_s`` and ``update_s`` from each handler kind's CPU seconds
    (``cpu_of(key, count)``, for ``count`` messages; None: not measured) less its modelled
    FLOPs (``features``: a modelled run's ``handler_stats``): see :func:`handler_costs`."""
    sums = {"message": [0.0, 0], "layer": [0.0, 0, 0], "update": [0.0, 0, 0]}
    kinds: dict[str, list] = {}  # message type -> [rest, count] of those of the message kind
    for key, row in features.items():
        count, _, flops, calls, updates, updated, elements, _ = row
        cpu = cpu_of(key, count)
        if cpu is None:
            continue
        rest = cpu - (flops + flops_per_element * elements) / core_flops
        if updates:
            sums["update"][0] += rest - update_flops_per_element * updated / core_flops
            sums["update"][1] += count
            sums["update"][2] += updates
        elif calls:
            sums["layer"][0] += rest
            sums["layer"][1] += count
            sums["layer"][2] += calls
        else:
            sums["message"][0] += rest
            sums["message"][1] += count
            kind = kinds.setdefault(key[1], [0.0, 0])
            kind[0] += rest
            kind[1] += count
    message_s = max(sums["message"][0] / max(sums["message"][1], 1), 0.0)
    layer, update = sums["layer"], sums["update"]
    return {
        "message_s": message_s,
        "layer_s": max((layer[0] - message_s * layer[1]) / max(layer[2], 1), 0.0),
        "update_s": max((update[0] - message_s * update[1]) / max(update[2], 1), 0.0),
        # each frequent kind of the message kind its own (a shard's fetch copies a segment
        # under its lock; a stage's forward that only asks for one does next to nothing)
        "message_type_s": {
            kind: max(rest / count, 0.0)
            for kind, (rest, count) in sorted(kinds.items())
            if count >= 16
        },
        "messages": sum(row[0] for row in features.values()),
    }


def processes_handler_costs(
    core_flops: float,
    flops_per_element: float,
    update_flops_per_element: float,
    widths: list[int],
    batch_size: int = 32,
    steps: int = 128,
) -> dict[str, Any]:
    """The handlers' fixed costs on the processes runtime, fitted as :func:`handler_costs`
    does, from the thread CPU each handler kind took in a profiled run there (the same 2
    replicas x 2 stages x 2 shards, on 2 workers): a shard's push and fetch work on shared
    memory under its segment locks, which costs more than in one process (the cores' caches
    hand the shard's lines back and forth). The CPU of a kind is its mean per message there
    times its count in the modelled run. And ``loop_s``: the workers' run loops' time per
    message beyond their handlers (the profile's unaccounted time, ``other_s``: picking the
    next message, looking at the pipes; the profile's own clock reads add to it)."""
    from .. import train
    from ..runtime.simulated import SimulatedRuntime

    data, args = _fit_workload(widths, steps, batch_size)
    real = train(
        mlp(widths), data, runtime="processes", runtime_options={"processes": 2, "profile": True},
        **args,
    )  # fmt: skip
    measured: dict[tuple[str, str], list[float]] = {}
    loop = [0.0, 0]  # the workers' run loops: unaccounted seconds, messages handled
    for name, process in real.stats["profile"].items():
        if name != "driver":  # (the driver's process also runs the driver's own thread)
            loop[0] += process["other_s"]
            rows = process["actors"].values()
            loop[1] += sum(h["n"] for row in rows for h in row["handlers"].values())
        for actor, row in process["actors"].items():
            for kind, h in row["handlers"].items():
                m = measured.setdefault((actor, kind), [0, 0.0])
                m[0] += h["n"]
                m[1] += h["cpu_s"]
    rt = SimulatedRuntime(
        0, machines=1, cores=1, placement="pack", local_latency_s=0.0, core_flops=core_flops
    )
    rt.handler_stats = {}
    train(mlp(widths), data, runtime=rt, **args)

    def cpu_of(key: tuple[str, str], count: int) -> float | None:
        m = measured.get(key)
        return m[1] / m[0] * count if m and m[0] else None

    fit = _fit(rt.handler_stats, cpu_of, core_flops, flops_per_element, update_flops_per_element)
    return fit | {"loop_s": max(loop[0], 0.0) / max(loop[1], 1)}


def measure(
    runtimes: tuple[str, ...] = ("local", "processes"),
    widths: list[int] | None = None,
    batch_size: int = 32,
    quick: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Every figure :func:`cluster_for` needs, measured on this machine."""
    for name in runtimes:
        if name not in RUNTIMES:
            raise ConfigError(f"runtime: cannot calibrate {name!r}; choose from {RUNTIMES}")
    widths = widths or [40, 256, 256, 10]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        say = log or (lambda m: None)
        repeats = 1 if quick else 5
        core = marginal_layer_rate(widths, batch_size, repeats)
        say(f"layers: {core:.3g} FLOP/s per core")
        figures_busy = busy_speed(widths, batch_size, repeats)
        say(f"a core while every core computes: {figures_busy:.2f} of its speed alone")
        per_element = copy_seconds_per_element(10_000 if quick else 100_000, repeats)
        say(f"tensor copy: {per_element * 1e9:.3f} ns per element")
        figures: dict[str, Any] = {
            "core_flops": core,
            "flops_per_element": per_element * core,
            "cores": os.cpu_count() or 1,
            "busy_speed": figures_busy,
            "runtimes": {},
        }
        update = update_seconds_per_element(repeats=repeats)
        figures["update_flops_per_element"] = update * core
        say(f"update rule (adagrad): {update * 1e9:.3f} ns per element")
        fit = handler_costs(
            core, per_element * core, update * core, widths, batch_size,
            32 if quick else 128, 1 if quick else 3,
        )  # fmt: skip
        figures["handlers"] = fit
        say(
            f"handlers ({fit['messages']} messages): {fit['message_s'] * 1e6:.1f} us per "
            f"message, {fit['layer_s'] * 1e6:.1f} us per layer call, "
            f"{fit['update_s'] * 1e6:.1f} us per update step, beyond their FLOPs; "
            f"jitter {fit['jitter']:.2f}"
        )
        hops = 40 if quick else 400
        big = (1 << 18) if quick else (1 << 22)
        for name in runtimes:
            small, cpu = seconds_per_message(name, hops, 0, 1 if quick else 3)
            entry = {"message_s": small, "cpu_s": cpu}
            if name == "processes":
                # Its bytes are copied by the two processes' CPUs (pickling, the pipe): per
                # byte, at a size of this project's messages (activations, shard slices); the
                # link is what the rally's wall time has beyond that CPU.
                mid = 1 << 16
                wall, cpu_mid = seconds_per_message(name, hops // 2, mid, 1 if quick else 3)
                entry["byte_cpu_s"] = max(cpu_mid - cpu, 0.0) / mid  # one received + one sent
                entry["bandwidth_Bps"] = mid / max(wall - small - (cpu_mid - cpu), mid / 1e11)
                entry["pipe_bytes"] = pipe_buffer_bytes()
                # A worker blocked on a shared shard's lock: how long until it has it.
                handoff = lock_handoff_seconds(40 if quick else 200)
                entry["lock_handoff_s"], entry["lock_handoff_jitter"] = handoff[:2]
                entry["lock_wake_s"] = handoff[2]
                # The driver's process (the master, the coordinator) against a worker: its
                # run loop shares the process with the driver's thread.
                _, entry["driver_cpu_s"] = seconds_per_message(
                    name, hops, 0, 1 if quick else 3, driver=True
                )
                entry["handlers"] = processes_handler_costs(
                    core, per_element * core, update * core, widths, batch_size,
                    32 if quick else 128,
                )  # fmt: skip
            elif name != "local":
                large, _ = seconds_per_message(name, max(4, hops // 10), big, 1 if quick else 3)
                entry["bandwidth_Bps"] = big / max(large - small, 1e-9)
            figures["runtimes"][name] = entry
            say(f"{name}: {small * 1e6:.1f} us per message, {cpu * 1e6:.1f} us of a process's CPU")
        return figures
    finally:
        torch.set_num_threads(threads)


def median_figures(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several calibrations' figures (:func:`measure`) as one: each number the median of its
    values across the samples (a machine's rates drift from one calibration to the next),
    anything else the first sample's. Every sample must have the same keys."""
    if not samples:
        raise ValueError("median_figures: no calibrations")

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            keys = set(first)
            if any(set(v) != keys for v in values):
                raise ValueError("median_figures: the calibrations' keys differ")
            return {k: merge([v[k] for v in values]) for k in first}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            middle = statistics.median(values)
            return type(first)(middle) if isinstance(first, int) else float(middle)
        return first

    return merge(list(samples))


def cluster_for(runtime: str, figures: dict[str, Any]) -> dict[str, Any]:
    """The simulated runtime's options that model ``runtime`` on the measured machine."""
    if runtime not in figures["runtimes"]:
        raise ConfigError(f"runtime: {runtime!r} was not measured")
    ping = figures["runtimes"].get("local", figures["runtimes"][runtime])["message_s"]
    # The handler fit (handler_costs); figures of an older calibration have one handler_s.
    fit = figures.get("handlers") or {"message_s": float(figures.get("handler_s", 0.0))}
    entry = figures["runtimes"][runtime]
    # The runtime's own fit where one was made (processes: its shared shards, its loop); the
    # handlers' spread stays the in-process one's.
    fit = fit | {k: v for k, v in entry.get("handlers", {}).items() if k != "messages"}
    # (figures of an older calibration have no fixed cost by message type)
    by_type = {k: max(float(v), ping) for k, v in fit.get("message_type_s", {}).items()}
    common = {
        "compute": "modelled",
        "core_flops": float(figures["core_flops"]),
        "flops_per_element": float(figures["flops_per_element"]),
        "message_s": max(float(fit["message_s"]), ping),
        "layer_s": float(fit.get("layer_s", 0.0)),
        "update_s": float(fit.get("update_s", 0.0)),
        "update_flops_per_element": float(figures.get("update_flops_per_element", 0.0)),
        **({"message_type_s": by_type} if by_type else {}),
        "jitter": float(fit.get("jitter", 0.0)),
        "header_bytes": 64,
    }
    if runtime == "local":
        # One thread handles every message: one machine of one core, each message its cost.
        return {**common, "machines": 1, "cores": 1, "placement": "pack", "local_latency_s": 0.0}
    # Worker processes: a machine per core; a message between them pays the in-process cost
    # in its handler, and the rest of its measured seconds as the link's latency. On
    # processes a shard is in every worker's shared memory and a push is applied in the
    # sender's process: shared; Ray gives each shard an actor of its own.
    shared = {"shared": True} if runtime == "processes" else {}
    # A message between processes costs each of the two some CPU (serialising, the run loop):
    # what the rally's processes spent per message beyond the in-process cost, half to the
    # sender's core and half to the receiver's; the rest of its seconds is waiting: latency.
    local_cpu = figures["runtimes"].get("local", {}).get("cpu_s", ping)
    cpu = float(entry.get("cpu_s", ping))
    wire = max(cpu - local_cpu, 0.0)
    cores = int(figures["cores"])
    # processes: one machine, its cores shared by the driver's process (the master, the
    # coordinator) and a worker process per core, each running one handler at a time, the
    # actors placed as the processes runtime places them (``processes``). Ray: a machine
    # per core (its actors are processes of their own).
    machines, per_machine = (1, cores) if runtime == "processes" else (cores, 1)
    procs = {"processes": cores} if runtime == "processes" else {}
    return {
        **common, "machines": machines, "cores": per_machine, **procs,
        "speeds": [float(figures.get("busy_speed", 1.0))] * machines,
        "send_s": wire / 2, "receive_s": wire / 2,
        "latency_s": max(float(entry["message_s"]) - ping - wire, 0.0),
        "local_latency_s": 0.0,
        "bandwidth_Bps": float(entry["bandwidth_Bps"]),
        # processes: each byte copied by the sender's and the receiver's CPU, half each
        **(
            {"send_byte_s": entry["byte_cpu_s"] / 2, "receive_byte_s": entry["byte_cpu_s"] / 2}
            if "byte_cpu_s" in entry
            else {}
        ),
        # The driver's process spends more per message than a worker (the rally with it in
        # the driver's process), half sending and half receiving, as send_s and receive_s.
        **(
            {"driver_message_s": max(float(entry["driver_cpu_s"]) - cpu, 0.0) / 2}
            if "driver_cpu_s" in entry and runtime == "processes"
            else {}
        ),
        # A process blocked on a shared shard's lock gets it only once woken, after its
        # release: the releasing process, going on, often takes it back first.
        **(
            {
                "lock_handoff_s": float(entry["lock_handoff_s"]),
                "lock_handoff_jitter": float(entry.get("lock_handoff_jitter", 0.0)),
                "lock_wake_s": float(entry.get("lock_wake_s", 0.0)),
            }
            if "lock_handoff_s" in entry and runtime == "processes"
            else {}
        ),
        # processes: its run loop around each handler (the profile's unaccounted time)
        **(
            {"loop_s": float(entry["handlers"]["loop_s"])}
            if "loop_s" in entry.get("handlers", {}) and runtime == "processes"
            else {}
        ),
        # A worker reads its pipes between handlers and its one writer thread sends in
        # order: a message larger than a pipe holds up its sender's later ones.
        **({"pipe_bytes": int(entry["pipe_bytes"])} if "pipe_bytes" in entry else {}),
        **shared,
    }  # fmt: skip


def to_toml(options: dict[str, Any], comment: str = "") -> str:
    """A cluster file (TOML) of ``options`` (scalars, lists, a placement table)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    lines = [f"# {line}" for line in comment.splitlines()]
    tables = {k: v for k, v in options.items() if isinstance(v, dict)}
    lines += [f"{k} = {value(v)}" for k, v in options.items() if k not in tables]
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
