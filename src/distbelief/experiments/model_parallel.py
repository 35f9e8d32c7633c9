"""``model-parallel`` (section 3, Figure 3): the speed-up of one model replica against the
number of partitions (machines) it is cut into, for a fully connected (FC) and a
locally-connected (LC) net of about the same parameter count, and the bytes that cross between
partitions per step.

The nets and their data are those of ``distbelief bench --only model-parallel``
(:mod:`distbelief.bench.model_parallel`, imported): FC L-W x 4-K and LC 1-C x 4-2-K of kernel 3
at length L (C sized to match), random inputs with K classes; SGD, mini-batches of 32, one
replica, one stage, one shard, ``pipeline_depth`` 1 (the paper's "mean time to process a
single mini-batch for simple SGD training"). The full sweep takes the benchmark's larger size
(L = 320: 6.6 and 6.9 million parameters) with K = 64 classes, so that every layer, the
classifier too, can be cut 64 ways. Three parts:

- **simulated** (the verdict's): P partitions on P machines of the calibrated cluster
  (``runtime="simulated"``, the figures of ``distbelief calibrate --runtime processes``: the
  per-core rate and per-layer costs, the loopback's latency, bandwidth and CPU per message;
  the default placement puts block b on machine b, the shard, data shard and master
  round-robin from machine 0). The time per step is virtual; speed-up = time per step at P = 1
  over at P. Compute is ``modelled`` (each block's FLOPs, counted from the shapes: the same
  virtual times from the same seed and cluster); ``sizes={"compute": "measured"}`` takes each
  handler's thread CPU time instead.
- **measured**: P = 1 and 2 on the ``processes`` runtime (one torch thread per worker), wall
  time per step, as the benchmark times them: the anchor the simulated P = 2 is compared with.
- **counted**: the bytes crossing between blocks per step from the plans
  (:func:`~distbelief.core.blocks.crossing_bytes`); the same on any machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bench import calibrate
from ..bench import model_parallel as bench
from ..bench.common import FULL, QUICK
from ..core.blocks import crossing_bytes, plan_split
from ..errors import ConfigError
from ..report import load_run
from ..runtime.simulated import read_cluster
from .base import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    Context,
    Experiment,
    Verdict,
    figure,
    fmt,
    save,
)

GAIN = 1.1
"""LC distributes well when its best simulated speed-up over P > 1 is at least this..."""
MARGIN = 1.25
"""... and at least this many times the FC net's best; it does not when it is no better than
the FC net's, or below 1 (no gain at all)."""
BYTES_SHARE = 0.5
"""LC's lower communication holds when its bytes per step are at most this share of the FC
net's at every P > 1, and does not when they are as many at some P."""
SLOWS = 0.9
"""The FC net gains and then slows when its best speed-up is above 1 at some P > 1 and its
speed-up at the largest P is at most this share of that best; it does not when the largest P
is its best."""
FC, LC = bench.NETS
CLUSTER_FILE = "cluster.toml"
"""The base cluster the simulated part used, written beside ``results.json`` (a cluster file
for ``sizes={"cluster": PATH}`` or ``distbelief train --cluster``)."""


def base_cluster(choice: str | Mapping[str, Any], quick: bool) -> dict[str, Any]:
    """The cluster every simulated run starts from: ``"calibrate"`` measures this machine now
    (``distbelief calibrate --runtime processes``; its quick version with ``quick``), a path
    reads a cluster file, a mapping is taken as it is."""
    if isinstance(choice, Mapping):
        return dict(choice)
    if choice == "calibrate":
        figures = calibrate.measure(("local", "processes"), quick=quick)
        return calibrate.cluster_for("processes", figures)
    if isinstance(choice, str):
        return read_cluster(choice)
    raise ConfigError(f"sizes: cluster must be 'calibrate', a path or a mapping, got {choice!r}")


def cluster_of(base: Mapping[str, Any], partitions: int, compute: str) -> dict[str, Any]:
    """The simulated cluster for ``partitions`` blocks: ``base`` on as many machines (each at
    the base's first speed), placed by default (block b on machine b); with ``measured``
    compute no jitter (the handlers' real CPU times vary by themselves)."""
    if compute not in ("measured", "modelled"):
        raise ConfigError(f"sizes: compute must be 'measured' or 'modelled', got {compute!r}")
    # P machines, one block each: not the processes runtime's workers on one machine (a
    # cluster calibrated for ``processes`` models that: ``processes``, ``driver_message_s``).
    dropped = ("placement", "machines", "speeds", "processes", "driver_message_s")
    options = {k: v for k, v in base.items() if k not in dropped}
    speed = float((base.get("speeds") or [1.0])[0])
    options.update(machines=partitions, speeds=[speed] * partitions, compute=compute)
    if compute == "measured":
        options["jitter"] = 0.0
    return options


def _paired(times: Mapping[int, Sequence[float | None]], p: int) -> float | None:
    """Speed-up of P over 1: the median over repeats of time at 1 over time at P."""
    pairs = [a / b for a, b in zip(times[1], times[p], strict=True) if a and b]
    return statistics.median(pairs) if pairs else None


def _sweep(
    ctx: Context, kind: str, parts: Sequence[int], steps: int, options: Any
) -> dict[str, Any]:
    """Every (seed, net, P) run of one part, alternated within each seed (a repeat): ms per
    step (virtual on ``simulated``), and the speed-ups of P over 1 (medians of paired
    ratios)."""
    width, length, classes = ctx.sizes["width"], ctx.sizes["length"], ctx.sizes["classes"]
    makers = bench.nets(width, length, classes)
    times: dict[str, dict[int, list[float | None]]] = {n: {p: [] for p in parts} for n in makers}
    seen: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in makers}
    for seed in ctx.seeds:
        data = bench.examples(steps * bench.BATCH, seed, length, classes)
        for name, make in makers.items():
            for p in parts:
                tag = "fc" if name == FC else "lc"
                o = ctx.train(
                    f"{kind}-{tag}-p{p}-s{seed}", make(seed), data, lr=bench.LR,
                    batch_size=bench.BATCH, epochs=1, optimizer="sgd", seed=seed,
                    partitions=p, pipeline_depth=ctx.sizes["pipeline_depth"], eval_every=0,
                    runtime_options=options(p) if options else None,
                )  # fmt: skip
                total = o.stats.get("virtual_s" if kind == "simulated" else "train_s")
                steps_done = o.stats.get("steps") or 0
                times[name][p].append(total / steps_done if total and steps_done else None)
                end = load_run(ctx.out / "runs" / o.name).end or {}
                crossed = end.get("stats", {}).get("partition_bytes")
                seen[name][p] = {
                    "bottleneck": o.stats.get("bottleneck"),
                    "partition_bytes_per_step": crossed / steps_done
                    if crossed is not None and steps_done else None,
                }  # fmt: skip
    points = []
    for name in makers:
        for p in parts:
            ms = [t * 1e3 if t else None for t in times[name][p]]
            points.append({
                "net": name, "partitions": p, "ms_per_step": ms,
                "best_ms_per_step": min((t for t in ms if t), default=None),
                "speedup": _paired(times[name], p), **seen[name][p],
            })  # fmt: skip
    return {"runtime": "simulated" if kind == "simulated" else "processes", "points": points}


def counted(
    width: int, parts: Sequence[int], length: int = bench.LENGTH, classes: int = bench.CLASSES
) -> dict[str, Any]:
    """Per net: its description, parameters and the bytes crossing between blocks per step of
    ``bench.BATCH`` at each P, from the plans (float32)."""
    out = {}
    for name, make in bench.nets(width, length, classes).items():
        model = make(0)
        out[name] = {
            "net": bench.describe(name, width, length, classes),
            "parameters": sum(q.numel() for q in model.parameters()),
            "bytes_per_step": {
                str(p): crossing_bytes(plan_split(list(model), p, (length,)), bench.BATCH)
                for p in parts
            },
        }
    return out


def measure(ctx: Context) -> dict[str, Any]:
    """The counted bytes, the measured runs (``processes``), then the simulated sweep on the
    calibrated cluster (calibrated first, so that the measured runs do not wait on it)."""
    s = ctx.sizes
    parts = list(s["partitions"])
    if parts[0] != 1 or any(p < 1 for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"sizes: partitions must start at 1 and not repeat, got {parts}")
    # a P the nets cannot take fails here, before any run
    nets = counted(s["width"], parts, s["length"], s["classes"])
    ctx.log("model-parallel: calibrating the cluster" if s["cluster"] == "calibrate" else
            "model-parallel: the cluster given")  # fmt: skip
    base = base_cluster(s["cluster"], ctx.quick)
    (ctx.out / CLUSTER_FILE).write_text(
        calibrate.to_toml(base, "the base cluster of distbelief experiment model-parallel"),
        encoding="utf-8",
    )
    # The measured part: a Context of its own on processes, recording into the same runs.
    real = Context(ctx.out, "processes", s, ctx.seeds, ctx.quick, ctx.log)
    real.outcomes = ctx.outcomes
    measured = _sweep(real, "measured", list(s["measured_partitions"]), s["measured_steps"], None)
    simulated = _sweep(
        ctx, "simulated", parts, s["steps"], lambda p: cluster_of(base, p, s["compute"])
    )
    return {
        "width": s["width"],
        "length": s["length"],
        "classes": s["classes"],
        "batch": bench.BATCH,
        "partitions": parts,
        "nets": nets,
        "simulated": simulated["points"],
        "measured": measured["points"],
        "compute": s["compute"],
        "cluster": base,
        "virtual": True,
        # the same numbers again only from the same cluster (a calibration differs each time;
        # rerun with this run's cluster.toml) and modelled compute (not thread CPU time)
        "reproducible": s["compute"] == "modelled" and s["cluster"] != "calibrate",
    }


def _speedups(points: Sequence[Mapping[str, Any]], net: str) -> dict[int, float | None]:
    return {p["partitions"]: p["speedup"] for p in points if p["net"] == net}


def judge(measured: dict[str, Any]) -> list[Verdict]:
    """Three rows, each a pure function of the numbers.

    1. LC distributes well (simulated): the best speed-up over P > 1 of LC (``lc``) and FC
       (``fc``): holds if ``lc >= GAIN`` and ``lc >= MARGIN * fc``; does not hold if
       ``lc <= fc`` or ``lc < 1``; else inconclusive.
    2. LC's lower communication (counted): holds if LC's bytes per step are at most
       ``BYTES_SHARE`` of FC's at every P > 1; does not hold if at least FC's at some P > 1;
       else inconclusive.
    3. FC gains, then slows past its best P (simulated): holds if FC's best speed-up (P = 1's
       1.0 included) is above 1 at some P > 1 and its speed-up at the largest P is at most
       ``SLOWS`` of that best; does not hold if the largest P is its best; else (it never
       gains, or flattens) inconclusive.
    """
    sim = measured["simulated"]
    fc, lc = _speedups(sim, FC), _speedups(sim, LC)
    more = [p for p in measured["partitions"] if p > 1]
    best_fc = max(((fc[p] or 0.0), p) for p in more)
    best_lc = max(((lc[p] or 0.0), p) for p in more)
    if best_lc[0] >= GAIN and best_lc[0] >= MARGIN * best_fc[0]:
        spread = HOLDS
    elif best_lc[0] <= best_fc[0] or best_lc[0] < 1.0:
        spread = DOES_NOT_HOLD
    else:
        spread = INCONCLUSIVE
    real = {(p["net"], p["partitions"]): p["speedup"] for p in measured["measured"]}

    def by_p(speedups: dict[int, float | None]) -> str:
        return ", ".join(f"{p}: {fmt(v, '.2f')}" for p, v in speedups.items())

    checks = []
    for name, sims in ((FC, fc), (LC, lc)):
        m = real.get((name, 2))
        if m is not None and sims.get(2) is not None:
            checks.append(f"{'FC' if name == FC else 'LC'} {m:.2f}x (simulated "
                          f"{sims[2]:.2f}x)")  # fmt: skip
    anchor = "; measured on processes at P = 2: " + ", ".join(checks) if checks else ""
    rows = [
        Verdict(
            claim="locally-connected models distribute well, better than fully connected ones",
            measured=f"simulated speed-up by P, LC: {by_p(lc)}; FC: {by_p(fc)}; best LC "
            f"{best_lc[0]:.2f}x at P = {best_lc[1]}, FC {best_fc[0]:.2f}x at P = {best_fc[1]}"
            f"{anchor}",
            rule=f"holds if LC's best speed-up over P > 1 is >= {GAIN} and >= {MARGIN}x FC's "
            "best; does not hold if it is <= FC's best or < 1; else inconclusive",
            verdict=spread,
            numbers={
                "best_lc": best_lc[0],
                "best_lc_p": best_lc[1],
                "best_fc": best_fc[0],
                "best_fc_p": best_fc[1],
            },  # fmt: skip
        )
    ]
    nets = measured["nets"]
    shares = {
        p: nets[LC]["bytes_per_step"][str(p)] / nets[FC]["bytes_per_step"][str(p)]
        for p in more
        if nets[FC]["bytes_per_step"][str(p)]
    }
    worst = max(shares.values(), default=None)
    if worst is None:
        lower = INCONCLUSIVE
    elif worst <= BYTES_SHARE:
        lower = HOLDS
    elif worst >= 1.0:
        lower = DOES_NOT_HOLD
    else:
        lower = INCONCLUSIVE
    bytes_by_p = "; ".join(
        f"{p}: LC {nets[LC]['bytes_per_step'][str(p)]:,} B, FC "
        f"{nets[FC]['bytes_per_step'][str(p)]:,} B" for p in more
    )  # fmt: skip
    rows.append(
        Verdict(
            claim="local connectivity has lower communication requirements",
            measured=f"bytes crossing between partitions per step of {measured['batch']} "
            f"(counted) by P: {bytes_by_p}; LC / FC at most {fmt(worst, '.3f')}",
            rule=f"holds if LC's bytes per step are <= {BYTES_SHARE} of FC's at every P > 1; "
            "does not hold if >= FC's at some P > 1; else inconclusive",
            verdict=lower,
            numbers={"worst_share": worst},
        )
    )
    largest = max(measured["partitions"])
    peak = max((fc[p] or 0.0, p) for p in measured["partitions"])
    last = fc.get(largest) or 0.0
    ratio = last / peak[0] if peak[0] else None
    if peak[1] > 1 and peak[0] > 1.0 and ratio is not None and ratio <= SLOWS:
        slows = HOLDS
    elif peak[1] == largest:
        slows = DOES_NOT_HOLD
    else:  # it never gains (its peak is P = 1), or it flattens without falling
        slows = INCONCLUSIVE
    rows.append(
        Verdict(
            claim="the fully connected net gains up to some number of partitions, then slows down",
            measured=f"FC's simulated speed-up peaks at P = {peak[1]} ({peak[0]:.2f}x); at "
            f"P = {largest} {last:.2f}x, {fmt(ratio, '.2f')} of the peak",
            rule=f"holds if FC's best speed-up is > 1 at some P > 1 and its speed-up at the "
            f"largest P is <= {SLOWS} of that best; does not hold if the largest P is its best; "
            "else (it never gains, or it flattens) inconclusive",
            verdict=slows,
            numbers={"peak": peak[0], "peak_p": peak[1], "at_largest": last},
        )
    )
    return rows


def draw(measured: dict[str, Any], out: Path) -> list[Path]:
    """Speed-up against P (simulated lines, measured hollow markers) and the bytes crossing
    per step against P (counted lines, the simulated runs' own count as crosses)."""
    parts = measured["partitions"]
    fig, ax = figure("speed-up of one replica against partitions", "partitions P (machines)",
                     "speed-up over P = 1")  # fmt: skip
    for i, (name, marker) in enumerate(((FC, "o"), (LC, "s"))):
        net = measured["nets"][name]["net"]
        sim = [p for p in measured["simulated"] if p["net"] == name and p["speedup"]]
        ax.plot(
            [p["partitions"] for p in sim],
            [p["speedup"] for p in sim],
            marker + "-",
            color=f"C{i}",
            label=f"{net}, simulated ({measured['compute']} compute)",
        )
        real = [p for p in measured["measured"] if p["net"] == name and p["speedup"]]
        ax.plot(
            [p["partitions"] for p in real],
            [p["speedup"] for p in real],
            marker,
            color=f"C{i}",
            markersize=11,
            markerfacecolor="none",
            markeredgewidth=1.6,
            linestyle="none",
            label=f"{net}, measured (processes, wall time)",
        )
    ax.axhline(1.0, color="0.5", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(parts, [str(p) for p in parts])
    ax.minorticks_off()
    first = save(fig, ax, out / "model_parallel_speedup.png")
    fig, ax = figure("bytes crossing between partitions per step",
                     "partitions P (machines)",
                     f"KiB per step (batch {measured['batch']})")  # fmt: skip
    for i, (name, marker) in enumerate(((FC, "o"), (LC, "s"))):
        net = measured["nets"][name]
        ax.plot(parts, [net["bytes_per_step"][str(p)] / 1024 for p in parts], marker + "-",
                color=f"C{i}", label=f"{net['net']} ({net['parameters']:,} parameters), "
                "counted from the plans")  # fmt: skip
        ran = [p for p in measured["simulated"] if p["net"] == name
               and p.get("partition_bytes_per_step") is not None]  # fmt: skip
        ax.plot(
            [p["partitions"] for p in ran],
            [p["partition_bytes_per_step"] / 1024 for p in ran],
            "x",
            color=f"C{i}",
            markersize=9,
            linestyle="none",
            label=f"{net['net']}, sent in the runs",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(parts, [str(p) for p in parts])
    ax.minorticks_off()
    return [first, save(fig, ax, out / "model_parallel_bytes.png")]


EXPERIMENT = Experiment(
    name="model-parallel",
    title="speed-up against partitions, fully connected and locally connected",
    section="3",
    statement="Models with local connectivity structures tend to be more amenable to extensive "
    "distribution than fully-connected structures, given their lower communication "
    "requirements. (Figure 3, section 6: the fully-connected speech model runs fastest on 8 "
    "machines, 2.2x faster than on one; partitioning it on more than 8 machines actually slows "
    "training. The much larger, locally-connected image models can benefit from using many "
    "more machines per model replica: the 1.7 billion parameter one more than 12x on 81.)",
    runtimes=("simulated",),
    quick={
        "width": QUICK.model_parallel_width,
        "length": bench.LENGTH,
        "classes": bench.CLASSES,
        "partitions": (1, 2, 4),
        "measured_partitions": (1, 2),
        "steps": 8,
        "measured_steps": 8,
        "pipeline_depth": 1,
        "compute": "modelled",
        # A stand-in for the calibration (a quick one takes 12 s): the processes figures of
        # docs/simulated.md's load-3 calibration, 64 us of CPU per message between workers.
        "cluster": {
            "machines": 2,
            "cores": 1,
            "speeds": [1.0, 1.0],
            "send_s": 2.7e-5,
            "receive_s": 2.7e-5,
            "latency_s": 0.0,
            "local_latency_s": 0.0,
            "bandwidth_Bps": 2.82e8,
            "header_bytes": 64,
            "shared": True,
        },
        "seeds": 1,
    },  # fmt: skip
    full={
        # the benchmark's larger size: the same LC channels on signals of length 320, and
        # the FC width that matches them
        "width": bench.sizes_of(FULL.model_parallel_width, FULL.model_parallel_long_length)[1][0],
        "length": FULL.model_parallel_long_length,
        "classes": 64,
        "partitions": (1, 2, 4, 8, 16, 32, 64),
        "measured_partitions": tuple(bench.TIMED_PARTS),
        "steps": 16,
        "measured_steps": FULL.model_parallel_steps // bench.LONG_STEPS,
        "pipeline_depth": 1,
        "compute": "modelled",
        "cluster": "calibrate",
        "seeds": 3,
    },
    measure=measure,
    judge=judge,
    draw=draw,
    timed=True,
)
