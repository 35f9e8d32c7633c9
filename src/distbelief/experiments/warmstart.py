"""``warmstart`` (section 4.1): training with one replica for a few steps before the others
start ("warmstarting") removes the instability of many asynchronous replicas. Many replicas of
Downpour SGD at a learning rate at the edge of stability, with warmstart steps in a small set;
the share of runs that diverge and the spread of the early training loss across seeds.

The rate is found by the experiment itself, before the measured runs, on a seed of its own
(never one of the measured seeds): the smallest rate of an ascending grid at which a run
without warmstart diverges (``edge = "first-diverging"``, the full sweep's), or the rate just
below it (``"last-stable"``).

The full sweep's third version (16 replicas, 40 epochs: 600 steps per replica) replaced 32
replicas and 4 epochs, where replica 0 ran only 28 steps in all, so warmstarts of 100 and 400
steps were both its whole run (docs/paper.md shows every version). A warmstart at least as
long as a replica's run makes the verdict inconclusive."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..models import mlp
from .base import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    Context,
    Experiment,
    Outcome,
    Verdict,
    figure,
    fmt,
    mnist1d_splits,
    save,
)

SEARCH_SEED_OFFSET = 1000
"""The edge-finding runs use seed ``first seed + SEARCH_SEED_OFFSET``, never a measured one."""
MIN_DIVERGED = 2
"""Fewer diverged runs than this without warmstart: no instability to remove (inconclusive)."""


def early_loss(outcome: Outcome, examples: int) -> float | None:
    """The training loss at the first point at or past ``examples`` (None: diverged)."""
    if outcome.diverged:
        return None
    return next((p["loss"] for p in outcome.losses if p["examples"] >= examples), None)


def measure(ctx: Context) -> dict[str, Any]:
    """Find the edge rate, then every (warmstart, seed) run at it."""
    s = ctx.sizes
    fit, val, test = mnist1d_splits(s["samples"], s["fit_examples"])
    common = {
        "batch_size": s["batch_size"], "epochs": s["epochs"], "replicas": s["replicas"],
        "shards": s["shards"], "optimizer": s["optimizer"],
    }  # fmt: skip
    search_seed = ctx.seeds[0] + SEARCH_SEED_OFFSET
    edge = s["lr_grid"][-1]
    searched = []
    for i, lr in enumerate(s["lr_grid"]):
        o = ctx.train(f"edge-lr{lr:g}", mlp(s["widths"], seed=search_seed), fit, val=val,
                      lr=lr, seed=search_seed, warmstart_steps=0, **common)  # fmt: skip
        searched.append({"lr": lr, "diverged": o.diverged})
        if o.diverged:
            # "first-diverging": the edge from above; "last-stable": from below (the rate
            # before it, where only some seeds may diverge)
            edge = lr if s["edge"] == "first-diverging" or i == 0 else s["lr_grid"][i - 1]
            break
    budget = s["epochs"] * len(fit[0])
    # Steps replica 0 runs in all (its part of the data, in batches, every epoch): a warmstart
    # of as many steps or more is its whole run, and cannot be told from a longer one.
    replica_steps = s["epochs"] * math.ceil(
        math.ceil(len(fit[0]) / s["replicas"]) / s["batch_size"]
    )
    early = int(s["early_fraction"] * budget)
    points = []
    for w in s["warmstart"]:
        runs = [
            ctx.train(
                f"w{w}-s{seed}",
                mlp(s["widths"], seed=seed),
                fit,
                val=val,
                test=test,
                lr=edge,
                seed=seed,
                warmstart_steps=w,
                **common,
            )  # fmt: skip
            for seed in ctx.seeds
        ]
        losses = [early_loss(o, early) for o in runs]
        kept = [v for v in losses if v is not None]
        points.append({
            "warmstart_steps": w,
            "diverged": sum(o.diverged for o in runs),
            "runs": len(runs),
            "diverged_share": sum(o.diverged for o in runs) / len(runs),
            "early_losses": losses,
            "early_loss_spread": statistics.pstdev(kept) if len(kept) > 1 else None,
            "test_accuracies": [o.test_accuracy for o in runs],
            "diverged_at": [o.diverged_at for o in runs],
        })  # fmt: skip
    return {
        "lr": edge, "search": searched, "search_seed": search_seed, "points": points,
        "early_examples": early, "replicas": s["replicas"], "optimizer": s["optimizer"],
        "replica_steps": replica_steps,
    }  # fmt: skip


def judge(measured: dict[str, Any]) -> list[Verdict]:
    """Holds if without warmstart at least ``MIN_DIVERGED`` runs diverge and with the most
    warmstart steps the diverged share is at most a quarter of that; does not hold if it is at
    least half of it; inconclusive otherwise, or when too few runs diverge without warmstart."""
    pts = measured["points"]
    none = next(p for p in pts if p["warmstart_steps"] == 0)
    most = max(pts, key=lambda p: p["warmstart_steps"])
    d0, dw = none["diverged_share"], most["diverged_share"]
    capped = most["warmstart_steps"] >= measured.get("replica_steps", math.inf)
    if none["diverged"] < MIN_DIVERGED or capped:
        verdict = INCONCLUSIVE
    elif dw <= d0 / 4:
        verdict = HOLDS
    elif dw >= d0 / 2:
        verdict = DOES_NOT_HOLD
    else:
        verdict = INCONCLUSIVE
    shares = ", ".join(f"{p['warmstart_steps']}: {p['diverged']}/{p['runs']}" for p in pts)
    spread = ", ".join(f"{p['warmstart_steps']}: {fmt(p['early_loss_spread'])}" for p in pts)
    return [
        Verdict(
            claim="warmstarting virtually eliminates instability",
            measured=f"{measured['replicas']} replicas, {measured['optimizer']} lr "
            f"{measured['lr']:g} (the edge found on seed {measured['search_seed']}), "
            f"{measured.get('replica_steps', '?')} steps per replica; diverged "
            f"runs by warmstart steps {shares}; early loss spread (std over seeds) {spread}",
            rule=f"holds if at least {MIN_DIVERGED} runs diverge without warmstart and the "
            "diverged share with the most warmstart steps is at most a quarter of that; does "
            "not hold if it is at least half; else inconclusive (also when the most warmstart "
            "steps are not fewer than the steps a replica runs: the warmstart is the whole run)",
            verdict=verdict,
            numbers={
                "diverged_share_without": d0,
                "diverged_share_most": dw,
                "diverged_without": none["diverged"],
                "most_warmstart_steps": most["warmstart_steps"],
                "replica_steps": measured.get("replica_steps"),
                "capped": capped,
            },
        )  # fmt: skip
    ]


def draw(measured: dict[str, Any], out: Path) -> list[Path]:
    """Diverged share and early loss spread against warmstart steps."""
    pts = measured["points"]
    xs = [p["warmstart_steps"] for p in pts]
    labels = [str(x) for x in xs]
    fig, ax = figure(f"diverged runs, {measured['replicas']} replicas, lr {measured['lr']:g}",
                     "warmstart steps", "share of seeds diverged")  # fmt: skip
    ax.bar(labels, [p["diverged_share"] for p in pts], color="C3", label="diverged share")
    ax.set_ylim(0, 1.05)
    first = save(fig, ax, out / "warmstart_diverged.png")
    fig, ax = figure(f"training loss after {measured['early_examples']:,} examples",
                     "warmstart steps", "training loss (each seed)")  # fmt: skip
    for i, p in enumerate(pts):
        vals = [v for v in p["early_losses"] if v is not None]
        ax.scatter([labels[i]] * len(vals), vals, color="C0", alpha=0.6)
    ax.scatter([], [], color="C0", label="a seed that did not diverge")
    second = save(fig, ax, out / "warmstart_early_loss.png")
    fig, ax = figure("when the diverged runs diverged", "warmstart steps",
                     "examples seen when found diverged")  # fmt: skip
    for i, p in enumerate(pts):
        at = [a for a in p.get("diverged_at", []) if a is not None]
        ax.scatter([labels[i]] * len(at), at, color="C3", alpha=0.6)
    ax.scatter([], [], color="C3", label="a seed that diverged")
    ax.set_ylim(bottom=0)
    third = save(fig, ax, out / "warmstart_diverged_at.png")
    return [first, second, third]


EXPERIMENT = Experiment(
    name="warmstart",
    title="warmstart steps against diverged runs, many replicas at the edge of stability",
    section="4.1",
    statement="... combined with a practice of \u201cwarmstarting\u201d model training with "
    "only a single model replica before unleashing the other replicas, it has virtually "
    "eliminated stability concerns in training deep networks using Downpour SGD.",
    runtimes=("local", "simulated", "processes"),
    quick={
        "samples": 10000,
        "fit_examples": 2000,
        "widths": (40, 32, 10),
        "replicas": 8,
        "epochs": 1,
        "batch_size": 32,
        "shards": 2,
        "optimizer": "sgd",
        "lr_grid": (0.5, 4.0),
        "warmstart": (0, 4),
        "early_fraction": 0.2,
        "edge": "first-diverging",
        "seeds": 1,
    },
    full={
        "samples": 10000,
        "fit_examples": None,
        "widths": (40, 256, 256, 10),
        "replicas": 16,
        "epochs": 40,
        "batch_size": 32,
        "shards": 2,
        "optimizer": "sgd",
        "lr_grid": (0.1, 0.15, 0.2, 0.3, 0.45, 0.7),
        "warmstart": (0, 25, 100, 400),
        "early_fraction": 0.2,
        "edge": "first-diverging",
        "seeds": 8,
    },  # fmt: skip
    measure=measure,
    judge=judge,
    draw=draw,
)
