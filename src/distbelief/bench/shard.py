"""``shard``: Adagrad pushes/s applied by one ``ParameterShard`` driven through the runtime
with ``Push`` messages, against bare ``torch.optim.Adagrad`` steps on a tensor of the same
size."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..algorithms.downpour.messages import Drain, Drained, Push
from ..algorithms.downpour.parameter_shard import ParameterShard
from ..core.layout import Layout
from ..runtime.local import LocalRuntime
from .baselines.plain import bare_adagrad_steps_per_s
from .common import Benchmark, Log, Row, Sizes, ratio, say


def shard_pushes_per_s(n: int, pushes: int, grads: Sequence[torch.Tensor], lr: float) -> float:
    """Pushes/s applied by one ``ParameterShard`` of ``n`` Adagrad parameters, driven through
    the in-process runtime: ``pushes`` Push messages, then a Drain whose reply ends the clock."""
    rt = LocalRuntime(seed=0)
    layout = Layout.build([n], 1)
    shard = rt.spawn(
        "shard0", ParameterShard, 0, torch.zeros(n), 0, layout.segments_of_shard(0), "adagrad", lr
    )
    try:
        t0 = time.perf_counter()
        for i in range(pushes):
            rt.tell(shard, Push(0, 0, (grads[i % len(grads)],), 0))
        for reply in rt.converse(shard, Drain(0), timeout=3600):
            if isinstance(reply, Drained):
                break
        elapsed = time.perf_counter() - t0
        applied = rt.actor(shard).updates_applied
    finally:
        rt.shutdown()
    if applied != pushes:
        raise RuntimeError(f"the shard applied {applied} of {pushes} pushes")
    return pushes / elapsed


def shard(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> list[dict[str, Any]]:
    """Shard pushes/s against bare Adagrad steps/s, at each size."""
    out = []
    for n in sizes.shard_sizes:
        gen = torch.Generator().manual_seed(seed)
        grads = [torch.randn(n, generator=gen) for _ in range(4)]
        pushes = max(10, sizes.shard_work // n)
        ps, bare = [], []
        for _ in range(repeats):
            bare.append(bare_adagrad_steps_per_s(n, pushes, grads, 0.01))
            ps.append(shard_pushes_per_s(n, pushes, grads, 0.01))
        say(log, f"shard {n:,}: pushes/s {[round(v) for v in ps]}, bare {[round(v) for v in bare]}")
        out.append(
            {
                "parameters": n,
                "pushes": pushes,
                "pushes_per_s": round(max(ps), 1),
                "baseline_steps_per_s": round(max(bare), 1),
                "ratio": ratio(max(ps), max(bare)),
                "samples": [round(v, 1) for v in ps],
                "baseline_samples": [round(v, 1) for v in bare],
            }
        )
        del grads
    return out


def rows(figures: list[dict[str, Any]]) -> list[Row]:
    """One row per shard size."""
    return [
        (
            "PS shard",
            f"{r['parameters']:,} parameters, adagrad",
            f"{r['pushes_per_s']:,.1f} pushes/s",
            f"torch.optim.Adagrad {r['baseline_steps_per_s']:,.1f} steps/s",
            f"{r['ratio']:.2f}",
        )  # fmt: skip
        for r in figures
    ]


BENCHMARK = Benchmark("shard", shard, rows)
