"""What writing a run directory costs: training examples/s with and without ``run_dir``.

``python benchmarks/runlog_overhead.py [--repeats 5] [--epochs 5] [--json]``

MNIST-1D, MLP 40-256-256-10, batch 32, the in-process runtime, in three layouts: the main
job (4 replicas x 2 stages, 2 shards, Adagrad), the overhead benchmark's 1 x 1 x 1 with SGD
(the shortest steps, so the log's share is largest) and 32 replicas x 2 stages (the most
per-replica records). Each repeat runs the configuration without a run directory, then with
one (``metrics.jsonl``, ``config.toml``, TensorBoard events), from the same seed, so both do
the same steps; the ratio is the median of the paired ratios of ``examples_per_s`` (training
phase: first mini-batch to last push). 1.0 means logging is free; 0.97 costs 3%.

On a busy machine the paired ratio drowns in noise, so the script also reports the share of
the training phase spent inside the run log's progress callback (``log share``): the time
the driver's thread, which also runs the in-process actors, gave to logging.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distbelief import train
from distbelief.bench import MLP, TORCH_THREADS, mnist1d_train
from distbelief.models import mlp
from distbelief.storage.runlog import RunLog


class TimedRunLog(RunLog):
    """A RunLog that adds up the seconds spent in its progress callback."""

    spent = 0.0

    def __call__(self, report) -> None:  # noqa: ANN001
        t = time.perf_counter()
        super().__call__(report)
        self.spent += time.perf_counter() - t


CONFIGS = (
    ("main job: 4 replicas x 2 stages, 2 shards, adagrad", 4, 2, 2, "adagrad"),
    ("1 replica x 1 stage, 1 shard, sgd", 1, 1, 1, "sgd"),
    ("32 replicas x 2 stages, 2 shards, adagrad", 32, 2, 2, "adagrad"),
)


def examples_per_s(replicas: int, stages: int, shards: int, optimizer: str, epochs: int,
                   run_dir: Path | None) -> tuple[float, float]:  # fmt: skip
    """Training examples/s, and the share of the training phase spent logging."""
    log = TimedRunLog(run_dir) if run_dir is not None else None
    result = train(
        mlp(MLP, seed=0), mnist1d_train(10_000), loss="cross_entropy", lr=0.05,
        batch_size=32, epochs=epochs, replicas=replicas, stages=stages, shards=shards,
        optimizer=optimizer, seed=0, run_dir=log,
    )  # fmt: skip
    share = log.spent / result.stats["train_s"] if log is not None else 0.0
    return result.stats["examples_per_s"], share


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(TORCH_THREADS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="distbelief-runlog-") as tmp:
        for label, *layout in CONFIGS:
            without, with_log, shares = [], [], []
            for rep in range(args.repeats):
                without.append(examples_per_s(*layout, args.epochs, None)[0])
                eps, share = examples_per_s(*layout, args.epochs, Path(tmp) / f"{label}{rep}")
                with_log.append(eps)
                shares.append(share)
            ratios = [w / b for w, b in zip(with_log, without)]
            rows.append({
                "config": label, "ratio": round(statistics.median(ratios), 3),
                "log_share": round(statistics.median(shares), 4),
                "without": [round(v) for v in without], "with": [round(v) for v in with_log],
            })  # fmt: skip
            if not args.json:
                print(f"{label}: with/without run directory {rows[-1]['ratio']:.3f} "
                      f"(median of {args.repeats} pairs; without {max(without):,.0f} ex/s, "
                      f"with {max(with_log):,.0f} ex/s at best); log share "
                      f"{rows[-1]['log_share']:.2%}", flush=True)  # fmt: skip
    if args.json:
        print(json.dumps({"epochs": args.epochs, "repeats": args.repeats, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
