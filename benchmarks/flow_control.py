"""Flow control on Ray: what it bounds, and what it costs.

1. **The bound.** One replica (an MLP 10-256-256-3 over 2 shards, ``n_fetch=1000``: one fetch,
   then a push every step), ``delay:shard0=10ms``: the stage pushes faster than shard0 takes
   the pushes. ``stats["flow"]["peak_buffered"]`` (the most bytes an actor had buffered towards
   one peer) without flow control (``flow_window_bytes=0``) and with a 256 KiB and a 1 MiB
   window, in the same Ray instance.
2. **The cost** when nothing is slow: the main job's shape (2 replicas x 2 stages x 2 shards,
   MLP 40-256-256-10 on random data, Adagrad) with flow control on (1 MiB) and off, alternated;
   the median of the paired examples/s ratios (on / off: 1.0 is parity).

    python benchmarks/flow_control.py [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import distbelief  # noqa: E402
from distbelief.bench import MLP  # noqa: E402
from distbelief.models import mlp  # noqa: E402
from distbelief.runtime.ray.runtime import local_ray  # noqa: E402


def data(n: int, features: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def bound(window: int) -> dict:
    result = distbelief.train(
        mlp((10, 256, 256, 3)), data(2048, 10, 3), loss="cross_entropy", lr=0.1,
        batch_size=16, epochs=1, seed=0, runtime="ray", shards=2, n_fetch=1000,
        runtime_options={"faults": ["delay:shard0=10ms"], "flow_window_bytes": window},
    )  # fmt: skip
    flow = result.stats["flow"]
    return {"window": window, "peak_buffered": flow["peak_buffered"], "waits": flow["waits"]}


def throughput(window: int) -> float:
    result = distbelief.train(
        mlp(MLP), data(8192, 40, 10), loss="cross_entropy", lr=0.05,
        batch_size=32, epochs=4, seed=0, runtime="ray", replicas=2, stages=2, shards=2,
        optimizer="adagrad", runtime_options={"flow_window_bytes": window},
    )  # fmt: skip
    return result.stats["examples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    on = 1 << 20
    with local_ray():
        bounds = [bound(w) for w in (0, 256 * 1024, on)]
        pairs = []
        for i in range(args.repeats):
            order = (on, 0) if i % 2 == 0 else (0, on)  # alternate who goes first
            got = {w: throughput(w) for w in order}
            pairs.append((got[on], got[0]))
    ratios = [a / b for a, b in pairs]
    out = {"bound": bounds, "throughput_pairs": pairs, "ratio": statistics.median(ratios)}
    if args.json:
        print(json.dumps(out))
        return
    for b in bounds:
        label = f"window {b['window'] // 1024} KiB" if b["window"] else "no flow control"
        print(
            f"{label:>18}: peak buffered {b['peak_buffered'] / 2**20:6.2f} MiB, waits {b['waits']}"
        )
    print("examples/s on/off: " + ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in pairs))
    print(f"ratio (median of paired on/off): {out['ratio']:.2f}")


if __name__ == "__main__":
    main()
