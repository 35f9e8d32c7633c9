"""``checkpoint``: the main job (4 replicas x 2 stages, 2 shards, Adagrad) with a checkpoint
every ``checkpoint_every`` steps (and one at the end) against the same run without checkpoints;
also the seconds the background writer spent, and the checkpoints written."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ..api import train
from ..models import mlp
from .common import MLP, Benchmark, Log, Row, Sizes, mnist1d_train, paired_ratio, say


def checkpoint_cost(
    sizes: Sizes, repeats: int, log: Log = None, seed: int = 0
) -> list[dict[str, Any]]:
    """The main job's examples/s with a checkpoint every N steps over the same without."""
    train_data = mnist1d_train(sizes.mnist1d_samples)
    settings = dict(loss="cross_entropy", lr=0.05, batch_size=32, epochs=sizes.checkpoint_epochs,
                    replicas=4, stages=2, shards=2, optimizer="adagrad", seed=seed)  # fmt: skip
    plain: list[float] = []
    timed: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes.checkpoint_every}
    with tempfile.TemporaryDirectory(prefix="distbelief-bench-") as tmp:
        for rep in range(repeats):
            plain.append(train(mlp(MLP, seed=seed), train_data, **settings).stats["examples_per_s"])
            for n in sizes.checkpoint_every:
                where = os.path.join(tmp, f"every{n}-{rep}")
                stats = train(mlp(MLP, seed=seed), train_data, checkpoint_dir=where,
                              checkpoint_every=n, **settings).stats  # fmt: skip
                timed[n].append(stats)
            say(
                log,
                f"checkpoint repeat {rep + 1}/{repeats}: none {plain[-1]:,.0f} ex/s, "
                + ", ".join(f"every {n} {v[-1]['examples_per_s']:,.0f}" for n, v in timed.items()),
            )
    return [
        {
            "checkpoint_every": n,
            "steps": runs[0]["steps"],
            "checkpoints_written": runs[0]["checkpoints_written"],
            "write_s": round(min(r["checkpoint_write_s"] for r in runs), 3),
            "examples_per_s": round(max(r["examples_per_s"] for r in runs)),
            "baseline_examples_per_s": round(max(plain)),
            "ratio": paired_ratio([r["examples_per_s"] for r in runs], plain),
            "samples": [round(r["examples_per_s"]) for r in runs],
            "baseline_samples": [round(v) for v in plain],
        }
        for n, runs in timed.items()
    ]


def rows(figures: list[dict[str, Any]]) -> list[Row]:
    """One row per checkpoint interval."""
    return [
        (
            "checkpoints",
            f"main job, every {r['checkpoint_every']:,} of {r['steps']:,} steps "
            f"({r['checkpoints_written']} written, {r['write_s']:.2f} s writing)",
            f"{r['examples_per_s']:,} ex/s",
            f"no checkpoints {r['baseline_examples_per_s']:,} ex/s",
            f"{r['ratio']:.2f}",
        )  # fmt: skip
        for r in figures
    ]


BENCHMARK = Benchmark("checkpoint", checkpoint_cost, rows)
