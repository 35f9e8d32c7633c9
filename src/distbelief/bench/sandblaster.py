"""``sandblaster``: time to 0.60 test accuracy on MNIST-1D, Sandblaster L-BFGS against Downpour
with Adagrad (same replicas and shards); the time per function evaluation with one replica
slowed 5x against none slowed, with portions and backup tasks on and off (on Ray, where a slow
replica really takes longer); and the coordinator's bytes per step against the parameter
count."""

from __future__ import annotations

from typing import Any

from ..api import train
from ..models import mlp
from .common import MLP, Benchmark, Log, Row, Sizes, mnist1d_split, paired_ratio, say


def _first_at(history: list[dict[str, float]], accuracy: float) -> float | None:
    return next((p["wall_s"] for p in history if p.get("accuracy", 0.0) >= accuracy), None)


def time_to_accuracy(
    sizes: Sizes, repeats: int, log: Log = None, seed: int = 0, target: float = 0.60
) -> dict[str, Any]:
    """Seconds of training until the test accuracy first reaches ``target``: Sandblaster
    (full batch, 4 replicas, 2 shards, every step evaluated) against Downpour with Adagrad
    (4 replicas x 1 stage, 2 shards, lr 0.05, batch 32, evaluated every 2,000 examples)."""
    train_set, test_set = mnist1d_split(sizes.mnist1d_samples)
    sb, dp, acc = [], [], {}
    for _ in range(repeats):
        r = train(
            mlp(MLP, seed=seed), train_set, loss="cross_entropy", lr=0.05, batch_size=32,
            epochs=15, replicas=4, shards=2, optimizer="adagrad", eval_data=test_set,
            eval_every=2000, seed=seed,
        )  # fmt: skip
        dp.append(_first_at(r.history.eval, target))
        acc["downpour"] = r.history.accuracy
        r = train(
            mlp(MLP, seed=seed), train_set, loss="cross_entropy", algorithm="sandblaster",
            steps=sizes.sandblaster_steps, replicas=4, shards=2, eval_data=test_set, seed=seed,
            runtime_options={"eval_steps": True},
        )  # fmt: skip
        sb.append(_first_at(r.history.eval, target))
        acc["sandblaster"] = r.history.accuracy
        say(log, f"time to {target}: downpour {dp[-1]} s, sandblaster {sb[-1]} s")
    pairs = [(a, b) for a, b in zip(sb, dp, strict=True) if a is not None and b is not None]
    best = lambda v: min((t for t in v if t is not None), default=None)  # noqa: E731
    return {
        "target": target, "sandblaster_s": best(sb), "downpour_s": best(dp),
        "ratio": paired_ratio([b for _, b in pairs], [a for a, _ in pairs]) if pairs else None,
        "final_accuracy": acc, "samples": sb, "baseline_samples": dp,
    }  # fmt: skip


def straggler(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> list[dict[str, Any]]:
    """Seconds per function evaluation with replica 3 of 4 slowed 5x over none slowed:
    with 32 portions and backup tasks, and with one portion per replica and no backups."""
    train_set, _ = mnist1d_split(sizes.mnist1d_samples)
    configs = (("portions and backup tasks on", 32, True), ("off: 1 portion per replica", 4, False))
    runs: dict[tuple[str, bool], list[float]] = {}
    counts: dict[str, list[int]] = {}
    for _ in range(repeats):
        for label, portions, backup in configs:
            for slow in (False, True):
                options: dict[str, Any] = {"backup_tasks": backup}
                if slow:
                    options["slow_replicas"] = {3: 5.0}
                r = train(
                    mlp(MLP, seed=seed), train_set, loss="cross_entropy",
                    algorithm="sandblaster", steps=3, replicas=4, shards=2, portions=portions,
                    seed=seed, runtime=sizes.straggler_runtime, runtime_options=options,
                )  # fmt: skip
                per_eval = r.stats["train_s"] / max(r.stats["function_evals"], 1)
                runs.setdefault((label, slow), []).append(per_eval)
                if slow:
                    counts[label] = r.stats["portions_done"]
        say(log, "straggler: " + ", ".join(f"{k}: {v[-1]:.3f} s" for k, v in runs.items()))
    return [
        {
            "config": label,
            "portions": portions,
            "backup_tasks": backup,
            "slowed_s": round(min(runs[(label, True)]), 4),
            "unslowed_s": round(min(runs[(label, False)]), 4),
            "ratio": paired_ratio(runs[(label, True)], runs[(label, False)]),
            "portions_done_slowed": counts[label],
            "runtime": sizes.straggler_runtime,
        }  # fmt: skip
        for label, portions, backup in configs
    ]


def coordinator_traffic(sizes: Sizes, log: Log = None, seed: int = 0) -> list[dict[str, Any]]:
    """Bytes to and from the coordinator per L-BFGS step, at several parameter counts."""
    train_set, _ = mnist1d_split(sizes.mnist1d_samples)
    out = []
    for hidden in sizes.coordinator_hidden:
        r = train(
            mlp((40, hidden, hidden, 10), seed=seed), train_set, loss="cross_entropy",
            algorithm="sandblaster", steps=3, replicas=4, shards=2, seed=seed,
        )  # fmt: skip
        steps = max(r.stats["steps"], 1)
        out.append({
            "parameters": r.stats["parameters"], "steps": r.stats["steps"],
            "bytes_per_step": round(r.stats["coordinator_bytes"] / steps),
            "messages_per_step": round(r.stats["coordinator_messages"] / steps),
            "parameter_bytes": r.stats["parameters"] * 4,
        })  # fmt: skip
        say(log, f"coordinator: {out[-1]}")
    return out


def sandblaster(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> dict[str, Any]:
    """The three Sandblaster figures (see the module doc)."""
    return {
        "time_to_accuracy": time_to_accuracy(sizes, repeats, log, seed),
        "straggler": straggler(sizes, repeats, log, seed),
        "coordinator": coordinator_traffic(sizes, log, seed),
    }


def rows(figures: dict[str, Any]) -> list[Row]:
    """Time to accuracy, then one row per straggler configuration and per coordinator size."""
    t = figures["time_to_accuracy"]
    fmt = lambda v: "not reached" if v is None else f"{v:.2f} s"  # noqa: E731
    out: list[Row] = [(
        "Sandblaster", f"time to {t['target']} test accuracy, 4 replicas, 2 shards, full "
        "batch", fmt(t["sandblaster_s"]), f"Downpour + Adagrad {fmt(t['downpour_s'])}",
        "-" if t["ratio"] is None else f"{t['ratio']:.2f}",
    )]  # fmt: skip
    for r in figures["straggler"]:
        out.append((
            "Sandblaster", f"s per evaluation, 1 of 4 replicas slowed 5x, {r['config']} "
            f"({r['runtime']})", f"{r['slowed_s']:.3f} s (time x{r['ratio']:.2f})",
            f"none slowed {r['unslowed_s']:.3f} s", f"{1 / r['ratio']:.2f}",
        ))  # fmt: skip
    for r in figures["coordinator"]:
        out.append((
            "Sandblaster", f"coordinator traffic, {r['parameters']:,} parameters",
            f"{r['bytes_per_step']:,} bytes/step", f"parameters {r['parameter_bytes']:,} "
            "bytes", f"{r['bytes_per_step'] / r['parameter_bytes']:.3f}",
        ))  # fmt: skip
    return out


BENCHMARK = Benchmark("sandblaster", sandblaster, rows)
