"""``overhead``: Downpour at 1 replica / 1 stage / 1 shard / n_fetch = n_push = 1 with SGD on
MNIST-1D (MLP 40-256-256-10, batch 32) against a plain ``torch.optim.SGD`` loop over the same
batches from the same initial model; also 2 stages, and 4 replicas over 2 shards."""

from __future__ import annotations

from typing import Any

from ..api import train
from ..models import mlp
from .baselines.plain import plain_sgd_examples_per_s
from .common import MLP, Benchmark, Log, Row, Sizes, mnist1d_train, paired_ratio, ratio, say

OVERHEAD_CONFIGS = (
    ("1 replica, 1 stage, 1 shard", 1, 1, 1),
    ("1 replica, 2 stages, 1 shard", 1, 2, 1),
    ("4 replicas, 1 stage, 2 shards", 4, 1, 2),
)
"""(label, replicas, stages, shards), all with n_fetch = n_push = 1 and SGD."""


def overhead(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> list[dict[str, Any]]:
    """Engine examples/s over plain-loop examples/s, for each of ``OVERHEAD_CONFIGS``."""
    train_data = mnist1d_train(sizes.mnist1d_samples)
    lr, batch, epochs = 0.05, 32, sizes.overhead_epochs
    plain: list[float] = []
    engine: dict[str, list[float]] = {label: [] for label, *_ in OVERHEAD_CONFIGS}
    for rep in range(repeats):
        plain.append(
            plain_sgd_examples_per_s(
                mlp(MLP, seed=seed), train_data, lr=lr, batch_size=batch, epochs=epochs, seed=seed
            )
        )
        for label, replicas, stages, shards in OVERHEAD_CONFIGS:
            result = train(
                mlp(MLP, seed=seed),
                train_data,
                loss="cross_entropy",
                lr=lr,
                batch_size=batch,
                epochs=epochs,
                replicas=replicas,
                stages=stages,
                shards=shards,
                optimizer="sgd",
                seed=seed,
            )
            engine[label].append(result.stats["examples_per_s"])
        say(
            log,
            f"overhead repeat {rep + 1}/{repeats}: plain {plain[-1]:,.0f} ex/s, "
            + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in engine.items()),
        )
    best_plain = max(plain)
    return [
        {
            "config": label,
            "replicas": r,
            "stages": st,
            "shards": sh,
            "examples_per_s": round(max(engine[label])),
            "baseline_examples_per_s": round(best_plain),
            "ratio": paired_ratio(engine[label], plain),
            "best_ratio": ratio(max(engine[label]), best_plain),
            "samples": [round(v) for v in engine[label]],
            "baseline_samples": [round(v) for v in plain],
        }
        for label, r, st, sh in OVERHEAD_CONFIGS
    ]


def rows(figures: list[dict[str, Any]]) -> list[Row]:
    """One row per configuration."""
    return [
        (
            "overhead",
            r["config"] + ", sgd",
            f"{r['examples_per_s']:,} ex/s",
            f"plain torch loop {r['baseline_examples_per_s']:,} ex/s",
            f"{r['ratio']:.2f}",
        )  # fmt: skip
        for r in figures
    ]


BENCHMARK = Benchmark("overhead", overhead, rows)
