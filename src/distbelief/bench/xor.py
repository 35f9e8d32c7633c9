"""``xor``: the seed's setting (50,000 single-example SGD steps over 25 replicas) against a
plain loop doing the same 50,000 single-example steps."""

from __future__ import annotations

from typing import Any

from ..api import train
from ..data import inputs
from .baselines.plain import plain_xor_seconds
from .common import Benchmark, Log, Row, Sizes, paired_ratio, ratio, say, xor_net

XOR_LAYOUTS = (
    ("1 stage, 1 shard", 1, 1),
    ("2 stages, 2 shards (the seed's actor per layer)", 2, 2),
)
"""(label, stages, shards) of the XOR comparison; the seed's setting does not fix the split."""


def xor_seed(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> list[dict[str, Any]]:
    """The seed's XOR setting through the engine, in each of ``XOR_LAYOUTS``, against the same
    single-example steps in a plain loop."""
    train_data, test = inputs.xor(num_samples=sizes.xor_examples, seed=seed)
    plain: list[float] = []
    engine: dict[str, list[float]] = {label: [] for label, *_ in XOR_LAYOUTS}
    accuracy: dict[str, float] = {}
    for rep in range(repeats):
        plain.append(plain_xor_seconds(train_data, seed, 0.5))
        for label, stages, shards in XOR_LAYOUTS:
            result = train(
                xor_net(seed),
                train_data,
                loss="mse",
                lr=0.5,
                batch_size=1,
                epochs=1,
                replicas=sizes.xor_replicas,
                stages=stages,
                shards=shards,
                optimizer="sgd",
                eval_data=test,
                seed=seed,
            )
            engine[label].append(result.stats["train_s"])
            accuracy[label] = result.history.accuracy
        say(
            log,
            f"xor repeat {rep + 1}/{repeats}: plain {plain[-1]:.2f} s, "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in engine.items()),
        )
    return [
        {
            "config": label,
            "examples": sizes.xor_examples,
            "replicas": sizes.xor_replicas,
            "stages": stages,
            "shards": shards,
            "train_s": round(min(engine[label]), 3),
            "baseline_s": round(min(plain), 3),
            # oriented like the others: baseline time / engine time (higher is better) ...
            "ratio": paired_ratio(plain, engine[label]),
            # ... and as the engine issue states its aim: engine time / baseline time (<= 1.3)
            "time_ratio": paired_ratio(engine[label], plain),
            "best_time_ratio": ratio(min(engine[label]), min(plain)),
            "test_accuracy": accuracy[label],
            "samples": [round(v, 3) for v in engine[label]],
            "baseline_samples": [round(v, 3) for v in plain],
        }
        for label, stages, shards in XOR_LAYOUTS
    ]


def rows(figures: list[dict[str, Any]]) -> list[Row]:
    """One row per layout."""
    return [
        (
            "XOR seed",
            f"{x['examples']:,} single-example steps, {x['replicas']} replicas, {x['config']}",
            f"{x['train_s']:.2f} s (time x{x['time_ratio']:.2f})",
            f"plain torch loop {x['baseline_s']:.2f} s",
            f"{x['ratio']:.2f}",
        )  # fmt: skip
        for x in figures
    ]


BENCHMARK = Benchmark("xor", xor_seed, rows)
