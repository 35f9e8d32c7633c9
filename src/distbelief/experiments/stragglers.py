"""``stragglers`` (section 4.2, and 4.1 on Downpour): a slow replica holds up neither
algorithm. Sandblaster's time per function evaluation against one replica's slowdown, for
portions per replica in a small set, backup tasks on and off; and Downpour's accuracy with a
slow replica (at the moment the fault-free run ended) and with a parameter shard killed
mid-run, against the fault-free run.

A slowdown needs a runtime where it slows something real: ``simulated`` (default; the slow
replica's machine runs at 1/k speed, times are virtual and reproducible from the seed) or
``processes`` (Sandblaster's ``slow_replicas``, a sleep in proportion to the portion's compute;
Downpour's ``delay`` fault per message; a killed shard is restarted and restored on both)."""

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
    Outcome,
    Verdict,
    figure,
    fmt,
    mean,
    mnist1d_splits,
    save,
    times,
)

SLOW = 3
"""The replica that is slowed (of 4)."""
AIM = 1.5
"""Sandblaster holds when, at the largest slowdown, the most portions with backup tasks take
at most this many times the unslowed time per evaluation..."""
GAIN = 2.0
"""... and one portion per replica without backups takes at least this many times longer
(relative to its own unslowed time) than they do."""
TOLERANCE = 0.03
"""Downpour holds when the faulty run's accuracy is at most this far below the fault-free's."""


def placement(replicas: int, shards: int, slow_speed: float) -> dict[str, Any]:
    """The simulated cluster: every shard and replica on its own machine, the slowed replica's
    machine at ``slow_speed``; Sandblaster's coordinator (Downpour's master and data shards
    spread) beside shard 0."""
    where = {f"shard{k}": k for k in range(shards)}
    where.update({f"replica{r}": shards + r for r in range(replicas)})
    speeds = [1.0] * (shards + replicas)
    speeds[shards + SLOW] = slow_speed
    return {"machines": shards + replicas, "placement": where, "speeds": speeds}


def sandblaster(ctx: Context, fit: Any) -> list[dict[str, Any]]:
    """Seconds per function evaluation for every (portions per replica, backups, slowdown)."""
    s = ctx.sizes
    out = []
    for per in s["portions_per_replica"]:
        for backups in (True, False):
            for k in s["slowdowns"]:
                per_eval = []
                for seed in ctx.seeds:
                    options: dict[str, Any] = {"backup_tasks": backups}
                    if ctx.runtime == "simulated":
                        options.update(placement(s["replicas"], s["shards"], 1.0 / k))
                        options["placement"]["coordinator"] = 0
                    elif k > 1:
                        options["slow_replicas"] = {SLOW: float(k)}
                    o = ctx.train(
                        f"sb-p{per}-{'backup' if backups else 'nobackup'}-x{k:g}-s{seed}",
                        mlp(s["widths"], seed=seed), fit, algorithm="sandblaster",
                        steps=s["steps"], replicas=s["replicas"], shards=s["shards"],
                        portions=per * s["replicas"], seed=seed, runtime_options=options,
                    )  # fmt: skip
                    total, _ = times(o, ctx.runtime)
                    evals = o.stats.get("function_evals") or 0
                    per_eval.append(total / evals if total and evals else None)
                out.append({"portions_per_replica": per, "backup_tasks": backups,
                            "slowdown": k, "s_per_eval": mean(per_eval)})  # fmt: skip
    return out


def accuracy_at(outcome: Outcome, runtime: str, moment: float) -> float | None:
    """Validation accuracy of the last evaluation at or before ``moment`` (the final one if
    the run ended by then)."""
    if outcome.diverged:
        return None
    total, at = times(outcome, runtime)
    if total is not None and total <= moment and outcome.evals:
        return outcome.evals[-1].get("accuracy")
    seen = [p for t, p in zip(at, outcome.evals) if t <= moment]
    return seen[-1].get("accuracy") if seen else None


def downpour(ctx: Context, fit: Any, val: Any, test: Any) -> dict[str, Any]:
    """The fault-free, slow-replica and killed-shard runs of Downpour, per seed."""
    s = ctx.sizes
    budget = s["epochs"] * len(fit[0])
    common = {
        "lr": s["lr"], "batch_size": s["batch_size"], "epochs": s["epochs"],
        "replicas": s["replicas"], "shards": s["shards"], "optimizer": s["optimizer"],
        "eval_every": budget // s["evaluations"],
    }  # fmt: skip
    simulated = ctx.runtime == "simulated"
    cases: dict[str, list[dict[str, Any]]] = {
        "fault-free": [], "slow replica": [], "killed shard": []
    }  # fmt: skip
    for seed in ctx.seeds:
        base = placement(s["replicas"], s["shards"], 1.0) if simulated else {}
        slow = (
            placement(s["replicas"], s["shards"], 1.0 / s["downpour_slowdown"])
            if simulated
            else {"faults": [f"delay:replica{SLOW}={s['downpour_delay']}"]}
        )
        # The shard dies halfway through its updates (every step pushes to both shards).
        kill = {**base, "faults": [f"kill:shard1@update={budget // s['batch_size'] // 2}"]}
        runs = {"fault-free": base, "slow replica": slow, "killed shard": kill}
        done: dict[str, Outcome] = {}
        for case in cases:
            done[case] = ctx.train(
                f"dp-{case.replace(' ', '-')}-s{seed}", mlp(s["widths"], seed=seed), fit,
                val=val, test=test, seed=seed, runtime_options=runs[case], **common,
            )  # fmt: skip
        end, _ = times(done["fault-free"], ctx.runtime)
        for case, o in done.items():
            total, at = times(o, ctx.runtime)
            cases[case].append({
                "seed": seed, "test_accuracy": o.test_accuracy,
                "val_final": o.val_accuracy, "time": total,
                "val_at_fault_free_end": accuracy_at(o, ctx.runtime, end or 0.0),
                "restarts": o.stats.get("restarts"),
                # the evaluations during training, then the final one at the run's end
                "curve": [{"t": t, "accuracy": p.get("accuracy")}
                          for t, p in zip([*at[: len(o.evals) - 1], total], o.evals)],
            })  # fmt: skip
    return cases


def measure(ctx: Context) -> dict[str, Any]:
    """Both parts."""
    s = ctx.sizes
    fit, val, test = mnist1d_splits(s["samples"], s["fit_examples"])
    return {
        "sandblaster": sandblaster(ctx, fit),
        "downpour": downpour(ctx, fit, val, test),
        "runtime": ctx.runtime,
        "virtual": ctx.runtime == "simulated",
        "slowdowns": list(s["slowdowns"]),
        "downpour_slowdown": (
            f"{s['downpour_slowdown']}x" if ctx.runtime == "simulated"
            else f"delay {s['downpour_delay']} per message"
        ),
    }  # fmt: skip


def _ratio(points: list[dict[str, Any]], per: int, backups: bool, k: float) -> float | None:
    at = {p["slowdown"]: p["s_per_eval"] for p in points
          if p["portions_per_replica"] == per and p["backup_tasks"] == backups}  # fmt: skip
    one, slow = at.get(1), at.get(k)
    return slow / one if one and slow else None


def judge(measured: dict[str, Any]) -> list[Verdict]:
    """Sandblaster: at the largest slowdown, the most portions per replica with backups cost
    at most ``AIM`` x and one portion without backups costs ``GAIN`` x as much more (holds);
    no better than one portion without backups: does not hold; else inconclusive. Downpour:
    each faulty case's accuracy (slow replica: at the moment the fault-free run ended; killed
    shard: at the end; means over seeds) within ``TOLERANCE`` of the fault-free run's final
    one: holds, else does not hold; a case not run, or no evaluation by then: inconclusive."""
    pts = measured["sandblaster"]
    k = max(measured["slowdowns"])
    most = max(p["portions_per_replica"] for p in pts)
    least = min(p["portions_per_replica"] for p in pts)
    on = _ratio(pts, most, True, k)
    off = _ratio(pts, least, False, k)
    if on is None or off is None:
        sb = INCONCLUSIVE
    elif on <= AIM and off >= GAIN * on:
        sb = HOLDS
    elif on >= off:
        sb = DOES_NOT_HOLD
    else:
        sb = INCONCLUSIVE
    unit = "virtual s" if measured["virtual"] else "s"
    verdicts = [
        Verdict(
            claim="portions and backup tasks keep a slow replica from holding up a batch",
            measured=f"time per evaluation ({unit}), one of 4 replicas slowed {k:g}x over "
            f"none slowed: {most} portions per replica with backups x{fmt(on, '.2f')}, "
            f"{least} per replica without x{fmt(off, '.2f')}",
            rule=f"holds if the first is <= {AIM} and the second >= {GAIN} times the first; "
            "does not hold if the first is >= the second; else inconclusive",
            verdict=sb,
            numbers={
                "ratio_portions_backups": on,
                "ratio_one_portion_no_backups": off,
                "slowdown": k,
            },
        )  # fmt: skip
    ]
    dp = measured["downpour"]
    free = mean([r["val_final"] for r in dp["fault-free"]])
    for case, key, claim, when in (
        ("slow replica", "val_at_fault_free_end",
         "a slow replica does not hold up Downpour's other replicas",
         "when the fault-free run ended"),
        ("killed shard", "val_final",
         "a failed machine does not stop Downpour (shard restarted, recovered)", "at the end"),
    ):  # fmt: skip
        if case not in dp:  # results written before the case ran on every runtime
            verdicts.append(Verdict(claim, f"not run on {measured['runtime']}", "", INCONCLUSIVE))
            continue
        got = mean([r[key] for r in dp[case]])
        if got is None or free is None:  # no evaluation by then: nothing to compare
            verdict = INCONCLUSIVE
        else:
            verdict = HOLDS if got >= free - TOLERANCE else DOES_NOT_HOLD
        what = measured["downpour_slowdown"] if case == "slow replica" else "shard 1 killed"
        verdicts.append(Verdict(
            claim=claim,
            measured=f"validation accuracy {when}, {what}: {fmt(got)}; fault-free final "
            f"{fmt(free)}",
            rule=f"holds if at most {TOLERANCE} below the fault-free run's final accuracy "
            "(means over seeds), else does not hold; inconclusive if no evaluation by then",
            verdict=verdict,
            numbers={"accuracy": got, "fault_free": free},
        ))  # fmt: skip
    return verdicts


def draw(measured: dict[str, Any], out: Path) -> list[Path]:
    """Sandblaster's time per evaluation against slowdown; Downpour's accuracy curves."""
    unit = "virtual s" if measured["virtual"] else "s"
    fig, ax = figure("Sandblaster: time per function evaluation", "slowdown of one replica",
                     f"{unit} per evaluation")  # fmt: skip
    pts = measured["sandblaster"]
    pers = sorted({p["portions_per_replica"] for p in pts})
    for i, per in enumerate(pers):
        for backups, style in ((True, "o-"), (False, "s--")):
            line = [p for p in pts if p["portions_per_replica"] == per
                    and p["backup_tasks"] == backups]  # fmt: skip
            ax.plot([p["slowdown"] for p in line], [p["s_per_eval"] for p in line], style,
                    color=f"C{i}", label=f"{per} portions/replica, backups "
                    f"{'on' if backups else 'off'}")  # fmt: skip
    first = save(fig, ax, out / "stragglers_sandblaster.png")
    fig, ax = figure("Downpour: validation accuracy with faults", f"time ({unit})",
                     "validation accuracy")  # fmt: skip
    for i, (case, runs) in enumerate(measured["downpour"].items()):
        for j, r in enumerate(runs):
            ax.plot([c["t"] for c in r["curve"]], [c["accuracy"] for c in r["curve"]], "-",
                    color=f"C{i}", alpha=0.8, label=case if j == 0 else None)  # fmt: skip
    ends = [r["time"] for r in measured["downpour"]["fault-free"] if r["time"]]
    if ends:
        ax.axvline(max(ends), color="0.5", linestyle=":", label="fault-free run ends")
    second = save(fig, ax, out / "stragglers_downpour.png")
    return [first, second]


EXPERIMENT = Experiment(
    name="stragglers",
    title="a slow replica against Sandblaster's portions and backup tasks, and Downpour",
    section="4.2",
    statement="To further manage slow model replicas at the end of a batch, the coordinator "
    "schedules multiple copies of the outstanding portions and uses the result from whichever "
    "model replica finishes first. (4.1: for asynchronous SGD, if one machine in a model "
    "replica fails, the other model replicas continue processing their training data and "
    "updating the model parameters via the parameter servers.)",
    runtimes=("simulated", "processes"),
    quick={
        "samples": 10000,
        "fit_examples": 2000,
        "widths": (40, 32, 10),
        "replicas": 4,
        "shards": 2,
        "steps": 1,
        "portions_per_replica": (1, 4),
        "slowdowns": (1, 5),
        "epochs": 1,
        "batch_size": 32,
        "optimizer": "adagrad",
        "lr": 0.05,
        "evaluations": 4,
        "downpour_slowdown": 10,
        "downpour_delay": "5ms",
        "seeds": 1,
    },
    full={
        "samples": 10000,
        "fit_examples": None,
        "widths": (40, 256, 256, 10),
        "replicas": 4,
        "shards": 2,
        "steps": 3,
        "portions_per_replica": (1, 4, 16),
        "slowdowns": (1, 2, 5, 10),
        "epochs": 6,
        "batch_size": 32,
        "optimizer": "adagrad",
        "lr": 0.05,
        "evaluations": 20,
        "downpour_slowdown": 10,
        "downpour_delay": "5ms",
        "seeds": 2,
    },  # fmt: skip
    measure=measure,
    judge=judge,
    draw=draw,
    timed=True,
)
