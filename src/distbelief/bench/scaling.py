"""``scaling``: the in-process runtime at 1..32 replicas (2 stages, 2 shards, Adagrad), each
configuration in a fresh subprocess (``python -m distbelief.bench worker SPEC_JSON``) so its
peak RSS (``VmHWM``) is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from ..api import train
from ..models import mlp
from .common import (
    MLP,
    TORCH_THREADS,
    Benchmark,
    Log,
    Row,
    Sizes,
    count,
    mnist1d_train,
    ratio,
    say,
)

WORKER_USAGE = "usage: python -m distbelief.bench worker SPEC_JSON  (internal)"


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB.

    Linux: ``VmHWM``, which exec resets. ``ru_maxrss`` is not used there: it carries the
    parent's peak across fork + exec, so every child of a big benchmark process reported the
    parent's figure. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB otherwise)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One scaling configuration, in its own process (``python -m distbelief.bench worker``)."""
    torch.set_num_threads(TORCH_THREADS)
    result = train(
        mlp(MLP, seed=spec["seed"]), torch.load(spec["data"]), loss="cross_entropy", lr=0.05,
        batch_size=32, epochs=spec["epochs"], replicas=spec["replicas"], stages=2, shards=2,
        optimizer="adagrad", seed=spec["seed"],
    )  # fmt: skip
    return {
        "replicas": spec["replicas"], "examples_per_s": result.stats["examples_per_s"],
        "staleness_mean": result.stats["staleness_mean"], "peak_rss_mb": peak_rss_mb(),
    }  # fmt: skip


def worker_main(argv: Sequence[str]) -> None:
    """``python -m distbelief.bench worker SPEC_JSON``: print the worker's figures as JSON."""
    if len(argv) != 2 or argv[0] != "worker":
        sys.exit(WORKER_USAGE)
    print(json.dumps(worker(json.loads(argv[1]))))


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "distbelief.bench", "worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scaling worker {spec} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scaling(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> list[dict[str, Any]]:
    """Examples/s and peak RSS at each replica count, each run in a fresh subprocess."""
    train_data = mnist1d_train(sizes.mnist1d_samples)
    runs: dict[int, list[dict[str, Any]]] = {r: [] for r in sizes.scaling_replicas}
    with tempfile.TemporaryDirectory(prefix="distbelief-bench-") as tmp:
        path = os.path.join(tmp, "train.pt")
        torch.save(train_data, path)
        for rep in range(repeats):
            for replicas, samples in runs.items():  # alternate replica counts in each repeat
                spec = {"data": path, "replicas": replicas, "epochs": sizes.scaling_epochs}
                samples.append(_run_worker({**spec, "seed": seed}))
            say(log, f"scaling repeat {rep + 1}/{repeats}: " + ", ".join(
                f"{r}: {v[-1]['examples_per_s']:,.0f} ex/s {v[-1]['peak_rss_mb']:.0f} MiB"
                for r, v in runs.items()
            ))  # fmt: skip
    first = runs[sizes.scaling_replicas[0]]
    first_eps = max(v["examples_per_s"] for v in first)
    first_rss = max(v["peak_rss_mb"] for v in first)
    out = []
    for replicas, samples in runs.items():
        best = max(samples, key=lambda v: v["examples_per_s"])
        rss = max(v["peak_rss_mb"] for v in samples)  # the conservative one
        out.append({
            "replicas": replicas, "examples_per_s": round(best["examples_per_s"]),
            "ratio_to_first": ratio(best["examples_per_s"], first_eps),
            "peak_rss_mb": round(rss, 1), "rss_over_first_mb": round(rss - first_rss, 1),
            "staleness_mean": round(best["staleness_mean"], 2),
            "samples": [round(v["examples_per_s"]) for v in samples],
        })  # fmt: skip
    return out


def rows(figures: list[dict[str, Any]]) -> list[Row]:
    """One row per replica count, against the first (fewest replicas)."""
    return [
        (
            "scaling",
            count(r["replicas"], "replica") + " x 2 stages, 2 shards, adagrad",
            f"{r['examples_per_s']:,} ex/s, peak RSS {r['peak_rss_mb']:.0f} MiB "
            f"({r['rss_over_first_mb']:+.0f})",
            count(figures[0]["replicas"], "replica") + f" {figures[0]['examples_per_s']:,} ex/s",
            f"{r['ratio_to_first']:.2f}",
        )  # fmt: skip
        for r in figures
    ]


BENCHMARK = Benchmark("scaling", scaling, rows)
