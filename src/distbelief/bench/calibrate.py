"""``distbelief calibrate``: measure this machine so that the simulated runtime's predictions
start from measured numbers, and write them as a cluster file (``--cluster FILE.toml``).

What is measured (each the best of a few repeats, on one torch thread, in this process):

- ``core_flops``: the model's layers' forward and backward FLOPs (as the simulated runtime
  counts them, :func:`~distbelief.runtime.simulated.layer_flops`) over the thread CPU seconds
  they took, at the run's batch size;
- ``flops_per_element``: the CPU seconds per element of a tensor copy (what taking a
  message's tensors costs at least), times ``core_flops``;
- ``handler_s``: what a Downpour run's handlers cost per message beyond their modelled
  compute (their Python, the queue, a shard's update rule, which is elementwise and so no
  matrix-product FLOPs; :func:`handler_seconds`): the simulator's ``message_s``;
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
import time
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


class Player(Actor):
    """Passes the ball back; the server times the whole rally and tells the driver."""

    def __init__(self) -> None:
        self.driver: Any = None
        self.t0 = 0.0

    @receives(Serve)
    def on_serve(self, msg: Serve, sender: Any) -> None:
        self.driver = sender
        self.t0 = time.perf_counter()
        self.ctx.tell(msg.peer, Ball(msg.hops - 1, msg.payload))

    @receives(Ball)
    def on_ball(self, msg: Ball, sender: Any) -> None:
        if msg.left == 0:
            self.ctx.tell(self.driver, Over(time.perf_counter() - self.t0))
        else:
            self.ctx.tell(sender, Ball(msg.left - 1, msg.payload))


def seconds_per_message(
    runtime: str, hops: int = 400, payload_bytes: int = 0, repeats: int = 3
) -> float:
    """Seconds per message of a rally of ``hops`` (even) messages between two actors on
    ``runtime`` (in two worker processes on ``processes``), each carrying ``payload_bytes``
    of tensor; the best of ``repeats`` rallies."""
    options: dict[str, Any] = {"processes": 2} if runtime == "processes" else {}
    rt = make_runtime(runtime, seed=0, **options)
    payload = torch.zeros(payload_bytes // 4) if payload_bytes else None
    try:
        a = rt.spawn("player0", Player)
        b = rt.spawn("player1", Player)
        best = float("inf")
        for _ in range(repeats + 1):  # the first warms up (process start, imports)
            for reply in rt.converse(a, Serve(b, hops, payload), timeout=600):
                if isinstance(reply, Over):
                    best = min(best, reply.seconds / hops)
                    break
        return best
    finally:
        rt.shutdown()


def layer_rate(widths: list[int], batch_size: int = 32, repeats: int = 5) -> float:
    """FLOP/s of one core on the model's layers: forward and backward of ``mlp(widths)`` on
    a mini-batch, FLOPs as the simulated runtime counts them over thread CPU seconds."""
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
    return flops / best


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


def handler_seconds(
    core_flops: float,
    flops_per_element: float,
    widths: list[int],
    batch_size: int = 32,
    steps: int = 128,
    repeats: int = 3,
) -> tuple[float, int]:
    """Seconds per message that a Downpour run on ``local`` spends beyond its modelled compute
    (the handlers' Python, the queue, the copies): a run of 1 replica x 1 stage x 1 shard,
    ``steps`` steps, its CPU seconds (the best of ``repeats``; the whole call, so its start
    and end are counted too) less the modelled compute
    the simulated runtime gives the same run on one core (no per-message cost), over the
    messages it handled. Returns (seconds per message, messages)."""
    from .. import train
    from ..runtime.simulated import SimulatedRuntime

    g = torch.Generator().manual_seed(0)
    n = steps * batch_size
    data = (torch.randn(n, widths[0], generator=g), torch.randint(0, widths[-1], (n,), generator=g))
    args = dict(
        loss="cross_entropy", lr=0.05, batch_size=batch_size, epochs=1, optimizer="adagrad",
        seed=0, eval_every=0,
    )  # fmt: skip

    def cpu_seconds() -> float:
        # CPU time, not wall time: on a loaded machine the wall clock counts other work
        t0 = time.process_time()
        train(mlp(widths), data, runtime="local", **args)
        return time.process_time() - t0

    cpu_seconds()  # warms up (the optimizer's first import)
    real = min(cpu_seconds() for _ in range(repeats))
    rt = SimulatedRuntime(
        0, machines=1, cores=1, placement="pack", core_flops=core_flops,
        flops_per_element=flops_per_element, message_s=0.0, local_latency_s=0.0,
    )  # fmt: skip
    modelled = train(mlp(widths), data, runtime=rt, **args).stats["virtual_s"]
    messages = rt.delivered_messages
    return max(real - modelled, 0.0) / messages, messages


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
        core = layer_rate(widths, batch_size, repeats)
        say(f"layers: {core:.3g} FLOP/s per core")
        per_element = copy_seconds_per_element(10_000 if quick else 100_000, repeats)
        say(f"tensor copy: {per_element * 1e9:.3f} ns per element")
        figures: dict[str, Any] = {
            "core_flops": core,
            "flops_per_element": per_element * core,
            "cores": os.cpu_count() or 1,
            "runtimes": {},
        }
        fitted, messages = handler_seconds(
            core, per_element * core, widths, batch_size, 32 if quick else 256, repeats
        )
        figures["handler_s"] = fitted
        say(f"handlers: {fitted * 1e6:.1f} us per message beyond their FLOPs ({messages} messages)")
        hops = 40 if quick else 400
        big = (1 << 18) if quick else (1 << 22)
        for name in runtimes:
            small = seconds_per_message(name, hops, 0, 1 if quick else 3)
            entry = {"message_s": small}
            if name != "local":
                large = seconds_per_message(name, max(4, hops // 10), big, 1 if quick else 3)
                entry["bandwidth_Bps"] = big / max(large - small, 1e-9)
            figures["runtimes"][name] = entry
            say(f"{name}: {small * 1e6:.1f} us per message")
        return figures
    finally:
        torch.set_num_threads(threads)


def cluster_for(runtime: str, figures: dict[str, Any]) -> dict[str, Any]:
    """The simulated runtime's options that model ``runtime`` on the measured machine."""
    if runtime not in figures["runtimes"]:
        raise ConfigError(f"runtime: {runtime!r} was not measured")
    ping = figures["runtimes"].get("local", figures["runtimes"][runtime])["message_s"]
    local = max(float(figures.get("handler_s", 0.0)), ping)
    entry = figures["runtimes"][runtime]
    common = {
        "compute": "modelled",
        "core_flops": float(figures["core_flops"]),
        "flops_per_element": float(figures["flops_per_element"]),
        "header_bytes": 64,
    }
    if runtime == "local":
        # One thread handles every message: one machine of one core, each message its cost.
        return {
            **common, "machines": 1, "cores": 1, "placement": "pack",
            "message_s": local, "local_latency_s": 0.0,
        }  # fmt: skip
    # Worker processes: a machine per core; a message between them pays the in-process cost
    # in its handler, and the rest of its measured seconds as the link's latency.
    return {
        **common, "machines": int(figures["cores"]), "cores": 1,
        "message_s": float(local),
        "latency_s": max(float(entry["message_s"]) - ping, 0.0),
        "local_latency_s": 0.0,
        "bandwidth_Bps": float(entry["bandwidth_Bps"]),
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
