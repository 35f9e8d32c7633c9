"""distbelief on Ray against Ray's documented asynchronous parameter server, in one Ray instance.

MNIST-1D (8,000 training examples), MLP 40-256-256-10, batch 32, SGD at lr 0.2 everywhere.
Rows: the baseline with 2 workers; distbelief with 2 replicas x 1 stage, 1 shard,
n_fetch = n_push = 1 (the comparison the targets are about); then 4 replicas x 2 stages x 2
shards, and 2 replicas with n_fetch = n_push = 4. Examples/s counts training time only
(actor start-up and evaluation excluded); "to 0.60" is the training wall time until the first
evaluation (every 2,000 examples) at >= 0.60 test accuracy.

Run: ``python benchmarks/ray_vs_baseline.py [--epochs 6] [--repeats 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from ray_ps_baseline import mlp, run_baseline, time_to

import distbelief
from distbelief.data.inputs import mnist1d
from distbelief.runtime.ray.runtime import local_ray

LR = 0.2
BATCH = 32
EVAL_EVERY = 2_000


def run_distbelief(train: Any, test: Any, epochs: int, **kw: Any) -> dict[str, Any]:
    """One distbelief run on the Ray runtime (Ray already up); the figures of one row."""
    t = time.perf_counter()
    result = distbelief.train(
        mlp(0),
        train,
        loss="cross_entropy",
        lr=LR,
        batch_size=BATCH,
        epochs=epochs,
        optimizer="sgd",
        eval_data=test,
        eval_every=EVAL_EVERY,
        seed=0,
        runtime="ray",
        **kw,
    )
    return {
        "examples_per_s": result.stats["examples_per_s"],
        "time_to_060_s": time_to(result.history.eval, 0.60),
        "final_accuracy": result.history.accuracy,
        "total_s": time.perf_counter() - t,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = mnist1d()
    examples = args.epochs * len(train[0])
    rows = {
        "Ray docs async PS, 2 workers": lambda: run_baseline(
            train,
            test,
            workers=2,
            lr=LR,
            batch_size=BATCH,
            examples=examples,
            eval_every=EVAL_EVERY,
        ),
        "distbelief 2 replicas x 1 stage, 1 shard": lambda: run_distbelief(
            train, test, args.epochs, replicas=2
        ),
        "distbelief 4 replicas x 2 stages x 2 shards": lambda: run_distbelief(
            train, test, args.epochs, replicas=4, stages=2, shards=2
        ),
        "distbelief 2 x 1, 1 shard, n_fetch = n_push = 4": lambda: run_distbelief(
            train, test, args.epochs, replicas=2, n_fetch=4, n_push=4
        ),
    }
    results: dict[str, dict[str, Any]] = {}
    with local_ray():
        for _ in range(args.repeats):
            for name, run in rows.items():
                r = run()
                results.setdefault(name, {"examples_per_s": [], "time_to_060_s": []})
                results[name]["examples_per_s"].append(r["examples_per_s"])
                results[name]["time_to_060_s"].append(r["time_to_060_s"])
                results[name]["final_accuracy"] = r["final_accuracy"]
    base = results["Ray docs async PS, 2 workers"]
    base_rate = statistics.median(base["examples_per_s"])
    base_t = _median(base["time_to_060_s"])
    print("| run | examples/s | x baseline | s to 0.60 | baseline time / this | final acc |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        rate = statistics.median(r["examples_per_s"])
        t = _median(r["time_to_060_s"])
        ratio_t = f"{base_t / t:.1f}" if t and base_t else "-"
        t_s = f"{t:.2f}" if t else "never"
        print(
            f"| {name} | {rate:,.0f} | {rate / base_rate:.1f} | {t_s} | {ratio_t} | "
            f"{r['final_accuracy']:.3f} |"
        )


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) == len(values) else None


if __name__ == "__main__":
    main()
