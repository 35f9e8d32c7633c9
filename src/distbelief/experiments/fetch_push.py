"""``fetch-push`` (section 4.1): fetching parameters every ``n_fetch`` steps and pushing
gradients every ``n_push`` steps reduces Downpour's communication overhead. Examples/s, test
accuracy after a fixed budget of examples (accuracy per example) and the time to a target
validation accuracy against n = n_fetch = n_push.

Its default runtime is ``simulated`` on a cluster of 1 Gbit/s links, every replica and shard on
a machine of its own: there communication costs what the link model says it does, and the
times are virtual, so the verdict is reproducible from the seed. On ``local`` a fetch and a
push copy almost nothing (the shards lend their tensors), so there is little to save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models import mlp
from .base import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    Context,
    Experiment,
    Verdict,
    figure,
    fmt,
    mean,
    mnist1d_splits,
    save,
    time_to,
    times,
)

HOLDS_SPEEDUP = 1.5
"""Holds when some n > 1 trains at least this many times as many examples/s as n = 1."""
FAILS_SPEEDUP = 1.1
"""Does not hold when no n > 1 reaches this many times n = 1's examples/s."""


def cluster(replicas: int, shards: int, options: dict[str, Any]) -> dict[str, Any]:
    """The simulated cluster: every shard and every replica on a machine of its own."""
    placement = {f"shard{k}": k for k in range(shards)}
    placement.update({f"replica{r}": shards + r for r in range(replicas)})
    return {"machines": shards + replicas, "placement": placement, **options}


def measure(ctx: Context) -> dict[str, Any]:
    """Every (n, seed) run."""
    s = ctx.sizes
    fit, val, test = mnist1d_splits(s["samples"], s["fit_examples"])
    options = (
        cluster(s["replicas"], s["shards"], s["cluster"]) if ctx.runtime == "simulated" else {}
    )
    eval_every = s["epochs"] * len(fit[0]) // s["evaluations"]
    points = []
    for n in s["n"]:
        runs = [
            ctx.train(
                f"n{n}-s{seed}",
                mlp(s["widths"], seed=seed),
                fit,
                val=val,
                test=test,
                lr=s["lr"],
                batch_size=s["batch_size"],
                epochs=s["epochs"],
                replicas=s["replicas"],
                shards=s["shards"],
                optimizer=s["optimizer"],
                n_fetch=n,
                n_push=n,
                seed=seed,
                eval_every=eval_every,
                runtime_options=options,
            )  # fmt: skip
            for seed in ctx.seeds
        ]
        rates = []
        for o in runs:
            total, _ = times(o, ctx.runtime)
            rates.append(o.stats["examples"] / total if total and not o.diverged else None)
        reach = [time_to(o, ctx.runtime, s["target"]) for o in runs]
        points.append({
            "n": n,
            "examples_per_s": mean(rates),
            "test_accuracy": mean([o.test_accuracy for o in runs]),
            "test_accuracies": [o.test_accuracy for o in runs],
            "time_to_target": max(reach) if all(t is not None for t in reach) else None,
            "times_to_target": reach,
            "staleness_mean": mean([o.stats.get("staleness_mean") for o in runs]),
            "bottleneck": runs[0].stats.get("bottleneck"),
        })  # fmt: skip
    return {"points": points, "target": s["target"], "runtime": ctx.runtime,
            "virtual": ctx.runtime == "simulated", "replicas": s["replicas"]}  # fmt: skip


def judge(measured: dict[str, Any]) -> list[Verdict]:
    """Throughput: holds if the best n > 1 reaches ``HOLDS_SPEEDUP`` x n = 1's examples/s,
    does not hold below ``FAILS_SPEEDUP`` x, inconclusive between. Time to target: holds if
    some n > 1 reaches the target sooner than n = 1 (every seed reaching it), does not hold if
    n = 1 is the soonest, inconclusive if n = 1 never reaches it."""
    pts = measured["points"]
    one = next(p for p in pts if p["n"] == 1)
    others = [p for p in pts if p["n"] > 1]
    base = one["examples_per_s"] or 0.0
    best = max(others, key=lambda p: p["examples_per_s"] or 0.0)
    speedup = (best["examples_per_s"] or 0.0) / base if base else 0.0
    if speedup >= HOLDS_SPEEDUP:
        throughput = HOLDS
    elif speedup < FAILS_SPEEDUP:
        throughput = DOES_NOT_HOLD
    else:
        throughput = INCONCLUSIVE
    reached = [p for p in others if p["time_to_target"] is not None]
    soonest = min(reached, key=lambda p: p["time_to_target"], default=None)
    if one["time_to_target"] is None:
        sooner = INCONCLUSIVE
    elif soonest is not None and soonest["time_to_target"] < one["time_to_target"]:
        sooner = HOLDS
    else:
        sooner = DOES_NOT_HOLD
    unit = "virtual s" if measured["virtual"] else "s"
    rates = ", ".join(f"{p['n']}: {fmt(p['examples_per_s'], ',.0f')}" for p in pts)
    reach = ", ".join(f"{p['n']}: {fmt(p['time_to_target'], '.3g')}" for p in pts)
    accs = ", ".join(f"{p['n']}: {fmt(p['test_accuracy'])}" for p in pts)
    return [
        Verdict(
            claim="fetching and pushing every n steps reduces the communication overhead",
            measured=f"examples/s ({unit}) by n: {rates}; best n={best['n']} is {speedup:.2f}x n=1",
            rule=f"holds if some n > 1 trains >= {HOLDS_SPEEDUP}x the examples/s of n = 1; "
            f"does not hold if none reaches {FAILS_SPEEDUP}x; else inconclusive",
            verdict=throughput,
            numbers={"speedup": speedup, "best_n": best["n"], "examples_per_s_n1": base},
        ),
        Verdict(
            claim="(implied) so a target accuracy is reached sooner, despite staler updates",
            measured=f"{unit} to validation accuracy {measured['target']} (slowest seed) by n: "
            f"{reach}; test accuracy after the budget by n: {accs}",
            rule="holds if some n > 1 reaches the target sooner than n = 1; does not hold if "
            "n = 1 is soonest; inconclusive if n = 1 never reaches it",
            verdict=sooner,
            numbers={
                "time_n1": one["time_to_target"],
                "soonest_n": soonest["n"] if soonest else None,
                "soonest_time": soonest["time_to_target"] if soonest else None,
            },
        ),  # fmt: skip
    ]


def draw(measured: dict[str, Any], out: Path) -> list[Path]:
    """Examples/s, test accuracy and time to target against n."""
    pts = measured["points"]
    ns = [p["n"] for p in pts]
    unit = "virtual s" if measured["virtual"] else "s"
    paths = []
    for key, title, ylabel, name in (
        ("examples_per_s", "examples/s against n_fetch = n_push", f"examples / {unit}",
         "fetch_push_throughput.png"),
        ("test_accuracy", "test accuracy after the same examples", "test accuracy",
         "fetch_push_accuracy.png"),
        ("time_to_target", f"time to validation accuracy {measured['target']}",
         f"{unit} (slowest seed)", "fetch_push_time_to_target.png"),
    ):  # fmt: skip
        fig, ax = figure(title, "n = n_fetch = n_push", ylabel)
        kept = [(n, p[key]) for n, p in zip(ns, pts) if p[key] is not None]
        ax.plot([k[0] for k in kept], [k[1] for k in kept], "o-", color="C0",
                label=f"{measured['replicas']} replicas ({measured['runtime']})")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        if not kept:
            ax.text(0.5, 0.5, "not reached within the budget", ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
        paths.append(save(fig, ax, out / name))
    return paths


EXPERIMENT = Experiment(
    name="fetch-push",
    title="n_fetch = n_push against examples/s, accuracy per example and time to a target",
    section="4.1",
    statement="It is possible to reduce the communication overhead of Downpour SGD by limiting "
    "each model replica to request updated parameters only every n_fetch steps and send "
    "updated gradient values only every n_push steps (where n_fetch might not be equal to "
    "n_push).",
    runtimes=("simulated", "local", "processes"),
    quick={
        "samples": 10000,
        "fit_examples": 2000,
        "widths": (40, 32, 10),
        "replicas": 4,
        "shards": 2,
        "epochs": 1,
        "batch_size": 32,
        "optimizer": "adagrad",
        "lr": 0.05,
        "n": (1, 4),
        "target": 0.3,
        "evaluations": 4,
        "cluster": {"bandwidth_Bps": 1.25e8},
        "seeds": 1,
    },
    full={
        "samples": 10000,
        "fit_examples": None,
        "widths": (40, 256, 256, 10),
        "replicas": 16,
        "shards": 2,
        "epochs": 6,
        "batch_size": 32,
        "optimizer": "adagrad",
        "lr": 0.05,
        "n": (1, 2, 4, 8, 16, 32),
        "target": 0.4,
        "evaluations": 24,
        "cluster": {"bandwidth_Bps": 1.25e8},
        "seeds": 2,
    },  # fmt: skip
    measure=measure,
    judge=judge,
    draw=draw,
    timed=True,
)
