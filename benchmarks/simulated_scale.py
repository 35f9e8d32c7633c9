"""The simulated runtime at the paper's scale: Downpour with 2,000 replicas (1 stage, 20 shards)
of the MNIST-1D MLP for a few steps each, and Sandblaster with 2,000 replicas for a few L-BFGS
steps, on a modelled cluster of 500 machines of 8 cores (10 Gbit/s links).

    python benchmarks/simulated_scale.py            # 2,000 replicas each (minutes)
    python benchmarks/simulated_scale.py --quick    # 50 replicas (seconds)
    python benchmarks/simulated_scale.py --json

Each run is a fresh subprocess, so that its peak RSS (``VmHWM``) is its own. Reported: real
seconds of the run (``train`` alone, and the process's whole life with the imports and the data),
the replica-steps simulated (Downpour: steps; Sandblaster: portions computed), real and CPU
seconds per replica-step (on a loaded machine the CPU figure is the run's own cost), virtual
seconds and examples/s, peak RSS. MNIST-1D is generated with enough samples
(``mnist1d(num_samples=...)``, cached on disk after the first time) that each Downpour replica
has ``STEPS`` mini-batches and each Sandblaster replica at least one portion per evaluation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

REPLICAS = 2000
STEPS = 4  # mini-batches per Downpour replica
BATCH = 32
CLUSTER = {"machines": 500, "cores": 8}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(algorithm: str, replicas: int) -> dict:
    """One run in this process; its figures."""
    t_start = time.perf_counter()
    import torch

    import distbelief
    from distbelief.data.datasets import mnist1d
    from distbelief.models import mlp

    torch.set_num_threads(1)  # one thread runs every actor: small ops, no pool to wake
    train_n = replicas * STEPS * BATCH
    # mnist1d keeps 80% for training; one size for the full run, so that its cache serves
    # every later run (generating 400,000 samples took 25 minutes on a loaded machine)
    samples = 10_000 if train_n <= 8_000 else max(400_000, -(-train_n * 5 // 4))
    (x, y), _ = mnist1d(num_samples=samples)
    x, y = x[:train_n], y[:train_n]
    model = mlp([40, 256, 256, 10])
    common = dict(loss="cross_entropy", seed=0, runtime="simulated", runtime_options=CLUSTER)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if algorithm == "downpour":
        result = distbelief.train(
            model, (x, y), lr=0.05, batch_size=BATCH, epochs=1, replicas=replicas, stages=1,
            shards=20, optimizer="adagrad", eval_every=0, **common,
        )  # fmt: skip
        units = result.stats["steps"]
    else:
        result = distbelief.train(
            model, (x, y), algorithm="sandblaster", steps=3, history=5, replicas=replicas,
            shards=20, portions=2 * replicas, **common,
        )  # fmt: skip
        units = sum(result.stats["portions_done"])
    train_s = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0  # on a loaded machine, what the run itself cost
    s = result.stats
    return {
        "algorithm": algorithm,
        "replicas": replicas,
        "examples": len(x),
        "replica_steps": units,
        "train_s": round(train_s, 1),
        "process_s": round(time.perf_counter() - t_start, 1),
        "real_s_per_replica_step": round(train_s / units, 5),
        "cpu_s": round(cpu_s, 1),
        "cpu_s_per_replica_step": round(cpu_s / units, 5),
        "virtual_s": s["virtual_s"],
        "virtual_examples_per_s": s["virtual_examples_per_s"],
        "bottleneck": s["bottleneck"],
        "staleness_mean": s.get("staleness_mean"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 replicas, not 2,000")
    parser.add_argument("--replicas", type=int, default=None)
    parser.add_argument("--only", choices=["downpour", "sandblaster"], default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    replicas = args.replicas or (50 if args.quick else REPLICAS)
    if args.one:
        print(json.dumps(one(args.one, replicas)))
        return
    rows = []
    for algorithm in [args.only] if args.only else ["downpour", "sandblaster"]:
        cmd = [sys.executable, __file__, "--one", algorithm, "--replicas", str(replicas)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
        if done.returncode != 0:
            sys.exit(f"{algorithm} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if not args.json:
            r = rows[-1]
            print(
                f"{algorithm:11} {r['replicas']:5} replicas  {r['replica_steps']:6} replica-steps"
                f"  train {r['train_s']:7.1f} s ({r['process_s']:.1f} s with start-up)"
                f"  {r['real_s_per_replica_step'] * 1e3:7.2f} ms/replica-step"
                f" (CPU {r.get('cpu_s_per_replica_step', float('nan')) * 1e3:.2f} ms)"
                f"  virtual {r['virtual_s']:.3f} s  peak RSS {r['peak_rss_mb']:.0f} MB"
                f"  bottleneck {r['bottleneck']['resource']} {r['bottleneck']['busy']:.2f}"
            )
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
