"""``downpour-vs-sandblaster`` (section 5, Figures 4 and 5): the time to a target accuracy
against the number of machines for Downpour SGD, Downpour with Adagrad and Sandblaster L-BFGS,
all three from one shared warm start, on the simulated cluster.

The warm start: a few hundred steps of plain SGD of the MNIST-1D MLP in one process (a torch
loop, seeded; its time is not counted, it is the same for every method). Every run starts from
those parameters. Then, for each replica count of the sweep: Downpour SGD and Downpour Adagrad
at each rate of a small grid, and Sandblaster (full batch, no rate: L-BFGS's line search); the
time to the target is the virtual time of the first evaluation on the validation split at or
above the target accuracy, and each Downpour variant keeps, per replica count, the rate of its
grid that reaches it soonest (picked on the validation split; the test set is only reported).

The cluster: every replica and every parameter shard on a machine of its own (1 stage, so one
machine per replica; Downpour's data shard beside its replica), 10 Gbit/s links, the modelled
compute's defaults (deterministic: the times repeat bit for bit from the seed). Downpour's
master, which runs the evaluations during training, is on a machine of its own made
``OBSERVER_SPEED`` times faster: the evaluations are the observer's and would otherwise occupy
the master (one actor, one message at a time) and hold up training, which the paper's
measurements did not. Sandblaster's coordinator is real work: it has a machine of its own at
speed 1, and its evaluations are the driver's snapshots (no modelled compute)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..models import mlp
from .base import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    Context,
    Data,
    Experiment,
    Outcome,
    Verdict,
    accuracy,
    figure,
    fmt,
    mnist1d_splits,
    save,
)

METHODS = ("downpour-sgd", "downpour-adagrad", "sandblaster")
"""The three methods of the paper's Figure 5 (its "Downpour SGD", "Downpour SGD w/Adagrad",
"Sandblaster L-BFGS")."""
LABELS = {
    "downpour-sgd": "Downpour SGD",
    "downpour-adagrad": "Downpour Adagrad",
    "sandblaster": "Sandblaster L-BFGS",
}
CUT_MARKERS = {"downpour-sgd": "v", "downpour-adagrad": "^", "sandblaster": "s"}
MODEST = 16
"""Modest resources: replica counts up to this (the paper's trade-off statement)."""
OBSERVER_SPEED = 1000.0
"""Downpour's master (the evaluations during training) runs on a machine this much faster."""


# ---------------------------------------------------------------- measuring


def warm_start(widths: tuple[int, ...], fit: Data, steps: int, lr: float, batch: int,
               seed: int) -> torch.nn.Module:  # fmt: skip
    """The shared warm start: ``steps`` steps of plain SGD on mini-batches drawn (seeded) from
    ``fit``, in one process."""
    model = mlp(list(widths), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = fit
    for _ in range(steps):
        rows = torch.randint(0, len(x), (batch,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def cluster(replicas: int, shards: int, algorithm: str) -> dict[str, Any]:
    """The simulated cluster: machine 0 for Downpour's master (``OBSERVER_SPEED``) or
    Sandblaster's coordinator (speed 1), then one machine per shard, one per replica (and its
    data shard)."""
    where: dict[str, int] = {"master" if algorithm == "downpour" else "coordinator": 0}
    where.update({f"shard{k}": 1 + k for k in range(shards)})
    for r in range(replicas):
        where[f"replica{r}"] = 1 + shards + r
        if algorithm == "downpour":
            where[f"data{r}"] = 1 + shards + r
    speeds = [OBSERVER_SPEED if algorithm == "downpour" else 1.0] + [1.0] * (shards + replicas)
    return {"machines": 1 + shards + replicas, "placement": where, "speeds": speeds}


def step_times(ctx: Context, outcome: Outcome) -> list[float]:
    """Sandblaster: the virtual time each L-BFGS step's report reached the driver, from the
    run's ``metrics.jsonl`` (one ``train`` record per step)."""
    path = ctx.out / "runs" / outcome.name / "metrics.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind") == "train" and "virtual_s" in record:
            out.append(float(record["virtual_s"]))
    return out


def curve(ctx: Context, outcome: Outcome) -> list[dict[str, float]]:
    """Validation accuracy against virtual time: the evaluations during training, then the
    final one at the run's end."""
    if outcome.diverged or not outcome.evals:
        return []
    total = outcome.stats.get("virtual_s")
    during = outcome.evals[:-1]
    if outcome.settings.get("algorithm") == "sandblaster":
        at = step_times(ctx, outcome)
    else:
        at = list(outcome.stats.get("virtual_eval_s", []))
    points = [{"t": t, "accuracy": p.get("accuracy")} for t, p in zip(at, during)]
    points.append({"t": total, "accuracy": outcome.evals[-1].get("accuracy")})
    return points


def reached(points: list[dict[str, float]], target: float) -> float | None:
    """The first time on the curve at or above ``target`` (None: never)."""
    return next((p["t"] for p in points if (p["accuracy"] or 0.0) >= target), None)


def measure(ctx: Context) -> dict[str, Any]:
    """The warm start, then every (method, replicas, rate, seed) run from it."""
    s = ctx.sizes
    replicas, epochs = tuple(s["replicas"]), tuple(s["downpour_epochs"])
    if len(epochs) != len(replicas):
        raise ConfigError("sizes: downpour_epochs needs one entry per replica count")
    fit, val, test = mnist1d_splits(s["samples"], s["fit_examples"])
    first = ctx.seeds[0]
    warm = warm_start(s["widths"], fit, s["warm_steps"], s["warm_lr"], s["batch_size"], first)
    warm_val = accuracy(warm, val)
    ctx.log(f"warm start: {s['warm_steps']} SGD steps, validation accuracy {warm_val:.3f}")
    target = s["target"]
    points: list[dict[str, Any]] = []
    for r, ep in zip(replicas, epochs):
        budget = ep * len(fit[0])
        for method in METHODS:
            grid = s["lr_grid"][method] if method != "sandblaster" else [None]
            tried = []
            for lr in grid:
                runs = []
                for seed in ctx.seeds:
                    if method == "sandblaster":
                        o = ctx.train(
                            f"sb-r{r}-s{seed}", copy.deepcopy(warm), fit, val=val, test=test,
                            algorithm="sandblaster", steps=s["sb_steps"], history=s["sb_history"],
                            replicas=r, shards=s["shards"], portions=s["sb_portions"] * r,
                            seed=seed,
                            runtime_options={**cluster(r, s["shards"], "sandblaster"),
                                             "eval_steps": True},
                        )  # fmt: skip
                    else:
                        o = ctx.train(
                            f"{method}-r{r}-lr{lr:g}-s{seed}", copy.deepcopy(warm), fit,
                            val=val, test=test, lr=lr, batch_size=s["batch_size"], epochs=ep,
                            replicas=r, shards=s["shards"], optimizer=method.split("-")[1],
                            seed=seed, eval_every=max(1, budget // s["evaluations"]),
                            runtime_options=cluster(r, s["shards"], "downpour"),
                        )  # fmt: skip
                    c = curve(ctx, o)
                    runs.append({
                        "seed": seed, "diverged": o.diverged, "curve": c,
                        "time_to_target": reached(c, target),
                        "end_s": o.stats.get("virtual_s"), "val_final": o.val_accuracy,
                        "test_accuracy": o.test_accuracy,
                        "staleness_mean": o.stats.get("staleness_mean"),
                        "bottleneck": o.stats.get("bottleneck"),
                    })  # fmt: skip
                reach = [x["time_to_target"] for x in runs]
                ends = [x["end_s"] for x in runs if x["end_s"] is not None]
                tried.append({
                    "lr": lr, "runs": runs,
                    # every seed must reach it: the slowest seed's time
                    "time_to_target": max(reach) if all(t is not None for t in reach) else None,
                    "end_s": max(ends) if ends else None,
                    "val_final": min((x["val_final"] or 0.0) for x in runs),
                })  # fmt: skip
            # the rate that reaches the target soonest; none does: the best final accuracy
            best = min(tried, key=lambda t: (t["time_to_target"] is None,
                                             t["time_to_target"] or 0.0,
                                             -t["val_final"]))  # fmt: skip
            points.append({
                "method": method, "replicas": r, "machines": 1 + s["shards"] + r,
                "lr": best["lr"], "time_to_target": best["time_to_target"],
                "end_s": best["end_s"], "val_final": best["val_final"],
                "test_accuracy": best["runs"][0]["test_accuracy"],
                "staleness_mean": best["runs"][0]["staleness_mean"],
                "bottleneck": best["runs"][0]["bottleneck"],
                "curve": best["runs"][0]["curve"],
                "grid": [{"lr": t["lr"], "time_to_target": t["time_to_target"],
                          "val_final": t["val_final"]} for t in tried],
                "budget_examples": budget if method != "sandblaster" else None,
            })  # fmt: skip
            ctx.log(f"{method} x{r}: time to {target} {fmt(best['time_to_target'], '.3g')} "
                    f"(lr {best['lr']})")  # fmt: skip
    return {
        "points": points, "target": target, "replicas": list(replicas),
        "warm_steps": s["warm_steps"], "warm_val_accuracy": warm_val, "shards": s["shards"],
        "curve_replicas": s["curve_replicas"], "modest": MODEST,
    }  # fmt: skip


# ---------------------------------------------------------------- the rules


def _point(measured: dict[str, Any], method: str, r: int) -> dict[str, Any]:
    return next(p for p in measured["points"] if p["method"] == method and p["replicas"] == r)


def speedup(measured: dict[str, Any], method: str) -> tuple[float | None, bool]:
    """Time to target at the fewest replicas over the time at the most, and whether that is
    exact (False: the most replicas did not reach the target by the run's end ``end_s``, so
    the speed-up is at most the figure given). None: the fewest replicas did not reach it."""
    rs = measured["replicas"]
    low, high = _point(measured, method, min(rs)), _point(measured, method, max(rs))
    if low["time_to_target"] is None:
        return None, False
    if high["time_to_target"] is not None:
        return low["time_to_target"] / high["time_to_target"], True
    if not high["end_s"]:
        return 0.0, False
    return low["time_to_target"] / high["end_s"], False


def judge(measured: dict[str, Any]) -> list[Verdict]:
    """Trade-off: at the modest replica counts (at most ``MODEST``), holds if Downpour with
    Adagrad reaches the target soonest of the three methods at more than half of them, does
    not hold if at none, inconclusive otherwise (or if no method reaches it at any).
    Scaling: holds if Sandblaster's speed-up from the fewest to the most replicas exceeds each
    Downpour variant's (for a variant that did not reach the target at the most replicas, the
    upper bound of its speed-up) and its time still falls at the last step of the sweep; does
    not hold if some Downpour variant's speed-up (bound) is at least Sandblaster's;
    inconclusive otherwise, or if a method does not reach the target at the fewest replicas or
    Sandblaster not at the most."""
    rs = sorted(measured["replicas"])
    target = measured["target"]
    modest = [r for r in rs if r <= MODEST]
    winners: dict[int, str | None] = {}
    for r in modest:
        timed = sorted((t, m) for m in METHODS
                       if (t := _point(measured, m, r)["time_to_target"]) is not None)  # fmt: skip
        # soonest strictly: a tie is no one's win
        tie = len(timed) > 1 and timed[0][0] == timed[1][0]
        winners[r] = ("tie" if tie else timed[0][1]) if timed else None
    wins = sum(w == "downpour-adagrad" for w in winners.values())
    if all(w is None for w in winners.values()):
        tradeoff = INCONCLUSIVE
    elif wins * 2 > len(modest):
        tradeoff = HOLDS
    elif wins == 0:  # (ties are not wins)
        tradeoff = DOES_NOT_HOLD
    else:
        tradeoff = INCONCLUSIVE
    times = "; ".join(
        f"{r}: "
        + ", ".join(f"{m.split('-')[-1]} {fmt(_point(measured, m, r)['time_to_target'], '.3g')}"
                    for m in METHODS)
        for r in rs
    )  # fmt: skip
    soonest = ", ".join(f"{r}: {w or 'none'}" for r, w in winners.items())

    ups = {m: speedup(measured, m) for m in METHODS}
    sb, sb_exact = ups["sandblaster"]
    sb_times = [_point(measured, "sandblaster", r)["time_to_target"] for r in rs]
    improving = (
        len(rs) > 1 and sb_times[-1] is not None and sb_times[-2] is not None
        and sb_times[-1] < sb_times[-2]
    )  # fmt: skip
    downs = [ups[m][0] for m in METHODS if m != "sandblaster"]
    if sb is None or not sb_exact or any(d is None for d in downs):
        scaling = INCONCLUSIVE
    elif any(d >= sb for d in downs):  # type: ignore[operator]
        scaling = DOES_NOT_HOLD
    elif improving:
        scaling = HOLDS
    else:
        scaling = INCONCLUSIVE
    shown = ", ".join(
        f"{m.split('-')[-1]} {'-' if u is None else ('' if exact else '<= ') + f'{u:.2f}x'}"
        for m, (u, exact) in ups.items()
    )  # fmt: skip
    sb_shown = ", ".join(f"{r}: {fmt(t, '.3g')}" for r, t in zip(rs, sb_times))
    return [
        Verdict(
            claim="Downpour with Adagrad reaches the target soonest at modest resources "
            "(the best trade-off)",
            measured=f"virtual s to validation accuracy {target} by replicas: {times}; "
            f"soonest at {soonest}",
            rule=f"at the replica counts up to {MODEST}: holds if Downpour Adagrad is soonest "
            "at more than half of them; does not hold if at none; else (or if no method "
            "reaches the target at any) inconclusive",
            verdict=tradeoff,
            numbers={"modest": modest, "soonest": winners, "adagrad_wins": wins},
        ),
        Verdict(
            claim="Sandblaster L-BFGS scales best with more machines",
            measured=f"speed-up of the time to target from {rs[0]} to {rs[-1]} replicas: "
            f"{shown}; Sandblaster's times by replicas {sb_shown}",
            rule="holds if Sandblaster's speed-up exceeds both Downpour variants' (a variant "
            "not reaching the target at the most replicas: the bound time at the fewest over "
            "its run's end) and its time still falls at the last step; does not hold if a "
            "Downpour variant's is at least Sandblaster's; else (or a method not reaching the "
            "target at the fewest, Sandblaster not at the most) inconclusive",
            verdict=scaling,
            numbers={
                "speedups": {m: u for m, (u, _) in ups.items()},
                "exact": {m: e for m, (_, e) in ups.items()},
                "sandblaster_improving": improving,
            },  # fmt: skip
        ),
    ]


# ---------------------------------------------------------------- figures


def draw(measured: dict[str, Any], out: Path) -> list[Path]:
    """Time to target against replicas (log x, log y), not-reached runs drawn at their run's
    end, hollow; and validation accuracy against virtual time at ``curve_replicas``, from the
    warm start's accuracy at 0."""
    rs = measured["replicas"]
    target = measured["target"]
    fig, ax = figure(f"time to validation accuracy {target} from one warm start",
                     "replicas (a machine each; + shards)",
                     "virtual s (modelled cluster)")  # fmt: skip
    for i, m in enumerate(METHODS):
        pts = [_point(measured, m, r) for r in rs]
        done = [(r, p["time_to_target"]) for r, p in zip(rs, pts) if p["time_to_target"]]
        ax.plot([d[0] for d in done], [d[1] for d in done], "o-", color=f"C{i}",
                label=LABELS[m])  # fmt: skip
        cut = [(r, p["end_s"]) for r, p in zip(rs, pts)
               if p["time_to_target"] is None and p["end_s"]]  # fmt: skip
        if cut:
            ax.plot([c[0] for c in cut], [c[1] for c in cut], CUT_MARKERS[m], mfc="none",
                    color=f"C{i}", ms=8, label=f"{LABELS[m]}: not reached (run's end)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.minorticks_off()
    first = save(fig, ax, out / "downpour_vs_sandblaster_time_to_target.png")
    r = measured["curve_replicas"]
    fig, ax = figure(f"validation accuracy against virtual time, {r} replicas",
                     "virtual s (modelled cluster)", "validation accuracy")  # fmt: skip
    warm = measured.get("warm_val_accuracy")
    for i, m in enumerate(METHODS):
        p = _point(measured, m, r)
        # every run starts at the warm start's accuracy, at virtual time 0
        c = ([{"t": 0.0, "accuracy": warm}] if warm is not None else []) + p["curve"]
        lr = f", lr {p['lr']:g}" if p["lr"] is not None else ""
        ax.plot([q["t"] for q in c], [q["accuracy"] for q in c], ".-", color=f"C{i}",
                label=f"{LABELS[m]}{lr}")  # fmt: skip
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target}")
    second = save(fig, ax, out / "downpour_vs_sandblaster_accuracy.png")
    return [first, second]


EXPERIMENT = Experiment(
    name="downpour-vs-sandblaster",
    title="time to a target accuracy against machines: Downpour SGD, Downpour Adagrad, "
    "Sandblaster L-BFGS",
    section="5",
    statement="Figures 4 and 5: Downpour SGD with Adagrad offers the best trade-off between "
    "resource usage and time to a target accuracy, while Sandblaster L-BFGS scales best with "
    "more cores.",
    runtimes=("simulated",),
    quick={
        "samples": 10000,
        "fit_examples": 2000,
        "widths": (40, 32, 10),
        "warm_steps": 50,
        "warm_lr": 0.1,
        "batch_size": 32,
        "shards": 2,
        "replicas": (1, 4),
        "downpour_epochs": (1, 1),
        "lr_grid": {"downpour-sgd": (0.1,), "downpour-adagrad": (0.03,)},
        "sb_steps": 4,
        "sb_history": 10,
        "sb_portions": 2,
        "target": 0.2,
        "evaluations": 5,
        "curve_replicas": 4,
        "seeds": 1,
    },
    full={
        "samples": 10000,
        "fit_examples": None,
        "widths": (40, 256, 256, 10),
        "warm_steps": 300,
        "warm_lr": 0.1,
        "batch_size": 32,
        "shards": 8,
        "replicas": (1, 4, 16, 64, 256),
        "downpour_epochs": (4, 6, 12, 16, 16),
        "lr_grid": {"downpour-sgd": (0.01, 0.03, 0.1), "downpour-adagrad": (0.003, 0.01, 0.03)},
        "sb_steps": 15,
        "sb_history": 10,
        "sb_portions": 2,
        "target": 0.5,
        "evaluations": 30,
        "curve_replicas": 16,
        "seeds": 1,
    },  # fmt: skip
    measure=measure,
    judge=judge,
    draw=draw,
    timed=True,
)
