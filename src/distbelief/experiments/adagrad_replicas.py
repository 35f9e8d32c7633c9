"""``adagrad-replicas`` (section 4.1): Adagrad at the shards lets more replicas work
productively than plain SGD. Test accuracy after a fixed budget of examples, and the mean
staleness, against the number of replicas, each optimizer at its best learning rate of a small
grid (picked on the validation split, per replica count, by the mean over seeds)."""

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
)

TOLERANCE = 0.03
"""A replica count is productive for an optimizer when its test accuracy (mean over seeds, at
the learning rate picked on validation) is at most this far below that optimizer's accuracy
with one replica, after the same budget of examples."""

OPTIMIZERS = ("sgd", "adagrad")


def measure(ctx: Context) -> dict[str, Any]:
    """Every (optimizer, replicas, lr, seed) run; per (optimizer, replicas) the lr with the best
    mean validation accuracy, and its test accuracy and staleness."""
    s = ctx.sizes
    fit, val, test = mnist1d_splits(s["samples"], s["fit_examples"])
    table: dict[str, dict[str, Any]] = {}
    for optimizer in OPTIMIZERS:
        for replicas in s["replicas"]:
            by_lr: dict[float, list[Any]] = {}
            for lr in s["lr"][optimizer]:
                for seed in ctx.seeds:
                    by_lr.setdefault(lr, []).append(
                        ctx.train(
                            f"{optimizer}-r{replicas}-lr{lr:g}-s{seed}",
                            mlp(s["widths"], seed=seed),
                            fit,
                            val=val,
                            test=test,
                            lr=lr,
                            batch_size=s["batch_size"],
                            epochs=s["epochs"],
                            replicas=replicas,
                            shards=s["shards"],
                            optimizer=optimizer,
                            seed=seed,
                        )  # fmt: skip
                    )

            def score(lr: float, by_lr: dict[float, list[Any]] = by_lr) -> float:
                # A diverged run scores 0: a rate that sometimes diverges is not the best.
                return mean([0.0 if o.diverged else o.val_accuracy for o in by_lr[lr]]) or 0.0

            best = max(by_lr, key=score)
            runs = by_lr[best]
            table[f"{optimizer}/{replicas}"] = {
                "optimizer": optimizer,
                "replicas": replicas,
                "lr": best,
                "val_accuracy": score(best),
                "test_accuracy": mean([0.0 if o.diverged else o.test_accuracy for o in runs]),
                "test_accuracies": [None if o.diverged else o.test_accuracy for o in runs],
                "staleness_mean": mean([o.stats.get("staleness_mean") for o in runs]),
                "diverged": sum(o.diverged for o in runs),
                "val_by_lr": {f"{lr:g}": score(lr) for lr in by_lr},
            }
    return {"replicas": list(s["replicas"]), "points": table, "tolerance": TOLERANCE,
            "examples_budget": s["epochs"] * len(fit[0])}  # fmt: skip


def max_productive(accuracy: dict[int, float | None], tolerance: float = TOLERANCE) -> int:
    """The largest replica count whose accuracy is within ``tolerance`` of the smallest
    count's (the counts above it need not all be productive: the largest one that is)."""
    counts = sorted(accuracy)
    base = accuracy[counts[0]] or 0.0
    good = [r for r in counts if (accuracy[r] or 0.0) >= base - tolerance]
    return max(good)


def judge(measured: dict[str, Any]) -> list[Verdict]:
    """Holds if Adagrad's largest productive replica count exceeds SGD's; does not hold if it
    is smaller, or equal while SGD stops short of the sweep's largest count; inconclusive when
    both are productive at every count (the sweep did not reach either's limit)."""
    counts = measured["replicas"]
    tol = measured["tolerance"]
    acc = {
        opt: {r: measured["points"][f"{opt}/{r}"]["test_accuracy"] for r in counts}
        for opt in OPTIMIZERS
    }
    m_sgd, m_ada = max_productive(acc["sgd"], tol), max_productive(acc["adagrad"], tol)
    top = max(counts)
    if m_ada > m_sgd:
        verdict = HOLDS
    elif m_ada == m_sgd == top:
        verdict = INCONCLUSIVE
    else:
        verdict = DOES_NOT_HOLD
    shown = lambda opt: ", ".join(f"{r}: {fmt(acc[opt][r])}" for r in counts)  # noqa: E731
    return [
        Verdict(
            claim="Adagrad extends the number of replicas that work productively",
            measured=f"most productive replicas: Adagrad {m_ada}, SGD {m_sgd} (test accuracy "
            f"by replicas, Adagrad {shown('adagrad')}; SGD {shown('sgd')})",
            rule=f"a replica count is productive when its test accuracy is within {tol} of the "
            "same optimizer's with the fewest replicas; holds if Adagrad's largest productive "
            "count exceeds SGD's, inconclusive if both are productive at every count, else "
            "does not hold",
            verdict=verdict,
            numbers={
                "max_productive_adagrad": m_ada,
                "max_productive_sgd": m_sgd,
                "accuracy": {o: {str(r): a for r, a in acc[o].items()} for o in acc},
            },
        )  # fmt: skip
    ]


def draw(measured: dict[str, Any], out: Path) -> list[Path]:
    """Test accuracy and mean staleness against replicas, one line per optimizer."""
    counts = measured["replicas"]
    paths = []
    for key, title, ylabel, name in (
        ("test_accuracy", f"test accuracy after {measured['examples_budget']:,} examples",
         "test accuracy (best lr on validation)", "adagrad_replicas_accuracy.png"),
        ("staleness_mean", "mean staleness of applied updates", "staleness (updates)",
         "adagrad_replicas_staleness.png"),
    ):  # fmt: skip
        fig, ax = figure(title, "replicas", ylabel)
        for i, opt in enumerate(OPTIMIZERS):
            pts = [measured["points"][f"{opt}/{r}"] for r in counts]
            ys = [p[key] for p in pts]
            ax.plot(counts, ys, "o-", color=f"C{i}", label="Downpour " + opt)
            if key == "test_accuracy":
                for r, p in zip(counts, pts):
                    vals = [a for a in p["test_accuracies"] if a is not None]
                    ax.scatter([r] * len(vals), vals, color=f"C{i}", alpha=0.3, s=10)
                    ax.annotate(f"lr {p['lr']:g}", (r, p[key]), fontsize="x-small",
                                textcoords="offset points", xytext=(4, 5 if i else -11),
                                color=f"C{i}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(r) for r in counts])
        ax.minorticks_off()
        if key == "test_accuracy":
            ax.set_ylim(0, 1)
        paths.append(save(fig, ax, out / name))
    return paths


EXPERIMENT = Experiment(
    name="adagrad-replicas",
    title="Adagrad against SGD at the shards, test accuracy and staleness against replicas",
    section="4.1",
    statement="We have found that Adagrad extends the maximum number of model replicas that can "
    "productively work simultaneously, and combined with a practice of \u201cwarmstarting\u201d "
    "model training with only a single model replica before unleashing the other replicas, it "
    "has virtually eliminated stability concerns in training deep networks using Downpour SGD.",
    runtimes=("local", "simulated", "processes"),
    quick={
        "samples": 10000,
        "fit_examples": 2000,
        "widths": (40, 32, 10),
        "replicas": (1, 16),
        "epochs": 1,
        "batch_size": 32,
        "shards": 2,
        "lr": {"sgd": (0.1,), "adagrad": (0.05,)},
        "seeds": 1,
    },
    full={
        "samples": 10000,
        "fit_examples": None,
        "widths": (40, 256, 256, 10),
        "replicas": (1, 4, 16, 64, 256),
        "epochs": 8,
        "batch_size": 32,
        "shards": 2,
        "lr": {"sgd": (0.01, 0.03, 0.1, 0.3, 0.6), "adagrad": (0.005, 0.015, 0.05, 0.15)},
        "seeds": 2,
    },  # fmt: skip
    measure=measure,
    judge=judge,
    draw=draw,
)
