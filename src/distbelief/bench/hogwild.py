"""``hogwild``: distbelief's fastest multi-core configuration on one machine (the
``processes`` runtime, 2 replicas x 1 stage x 1 shard, Adagrad, n_fetch = n_push = 1; one row
with the shard's updates locked, one with ``shard_updates="hogwild"``) against Hogwild
(:mod:`.baselines.hogwild`: PyTorch's ``mnist_hogwild`` pattern with 2 worker processes) on the
same model, data, batch and optimizer; start-up (call wall time - training time) too."""

from __future__ import annotations

import statistics
import time
from typing import Any

from ..api import train
from ..models import mlp
from .baselines import hogwild as baseline
from .common import MLP, Benchmark, Log, Row, Sizes, mnist1d_train, paired_ratio, ratio, say

HOGWILD_MODES = ("locked", "hogwild")
"""The processes runtime's ``shard_updates`` modes, each a row against the same Hogwild runs."""


def hogwild(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> list[dict[str, Any]]:
    """The processes runtime at 2 replicas, in each ``shard_updates`` mode, against Hogwild
    with 2 workers, alternating: one row per mode, each with its median of paired ratios."""
    train_data = mnist1d_train(sizes.mnist1d_samples)
    lr, batch, epochs, workers = 0.05, 32, sizes.hogwild_epochs, 2
    engine: dict[str, list[float]] = {mode: [] for mode in HOGWILD_MODES}
    startup: dict[str, list[float]] = {mode: [] for mode in HOGWILD_MODES}
    plain: list[float] = []
    plain_startup: list[float] = []
    for rep in range(repeats):
        h = baseline.hogwild(
            mlp(MLP, seed=seed), train_data, workers=workers, lr=lr, batch_size=batch,
            epochs=epochs, seed=seed,
        )  # fmt: skip
        plain.append(h["examples_per_s"])
        plain_startup.append(h["wall_s"] - h["train_s"])
        for mode in HOGWILD_MODES:
            t = time.perf_counter()
            result = train(
                mlp(MLP, seed=seed), train_data, loss="cross_entropy", lr=lr, batch_size=batch,
                epochs=epochs, replicas=workers, optimizer="adagrad", seed=seed,
                runtime="processes", runtime_options={"shard_updates": mode},
            )  # fmt: skip
            startup[mode].append(time.perf_counter() - t - result.stats["train_s"])
            engine[mode].append(result.stats["examples_per_s"])
        say(
            log,
            f"hogwild repeat {rep + 1}/{repeats}: Hogwild {plain[-1]:,.0f} ex/s, processes "
            "runtime "
            + ", ".join(f"{mode} {engine[mode][-1]:,.0f} ex/s" for mode in HOGWILD_MODES),
        )
    return [
        {
            "config": f"{workers} replicas x 1 stage, 1 shard, adagrad, runtime processes, "
            f"shard_updates {mode}",
            "replicas": workers,
            "shard_updates": mode,
            "examples_per_s": round(max(engine[mode])),
            "baseline_examples_per_s": round(max(plain)),
            "ratio": paired_ratio(engine[mode], plain),
            "best_ratio": ratio(max(engine[mode]), max(plain)),
            "startup_s": round(statistics.median(startup[mode]), 3),
            "baseline_startup_s": round(statistics.median(plain_startup), 3),
            "samples": [round(v) for v in engine[mode]],
            "baseline_samples": [round(v) for v in plain],
        }
        for mode in HOGWILD_MODES
    ]


def rows(figures: list[dict[str, Any]]) -> list[Row]:
    """One row per ``shard_updates`` mode."""
    return [
        (
            "Hogwild",
            r["config"],
            f"{r['examples_per_s']:,} ex/s, start-up {r['startup_s']:.2f} s",
            f"Hogwild, {r['replicas']} processes {r['baseline_examples_per_s']:,} ex/s, "
            f"start-up {r['baseline_startup_s']:.2f} s",
            f"{r['ratio']:.2f}",
        )  # fmt: skip
        for r in figures
    ]


BENCHMARK = Benchmark("hogwild", hogwild, rows)
