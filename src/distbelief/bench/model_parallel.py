"""``model-parallel``: the shape of the paper's Figure 3 with partitions (a stage's layers cut
into blocks of units, one actor per block; issue 23, docs/partitions.md). Two nets of about the
same parameter count, on data of MNIST-1D's input shape (40 features, random values: time per
step does not depend on them) with 16 classes, so that every layer, the classifier too, splits
16 ways:

- fully connected: widths 40, W, W, W, W, 16 (W = ``model_parallel_width``);
- locally connected: ``LocallyConnected1d`` layers of kernel 3 at full length 40 (1 -> C, then
  three C -> C, then C -> 2) and a ``Linear`` 80 -> 16, with C ~ W / sqrt(120) so that its
  three square layers (40 x 3 x C^2 weights each) hold what the fully connected net's three
  W x W layers hold.

(a) **Timed**: mean time per mini-batch of 32 (SGD, one replica, one stage, one shard, one
torch thread per process) on the ``processes`` runtime with P = 1 and 2 partitions, beside the
same net in a plain one-process torch loop; every run alternates with the others in each
repeat and ratios are medians of paired ratios. With 2 partitions also at ``pipeline_depth``
2 and 4 (a block computes one mini-batch while it waits for another's halo; each backward
pass uses its forward's parameters, one to three steps stale): the rows say which depth,
and the last speedup row of each net is the best depth's. The headline (depth 1) is SGD
every step, as the plain loop.

(b) **Counted**: the bytes that cross between blocks per step for P in {1, 2, 4, 8, 16}, from
the plans (:func:`~distbelief.core.blocks.crossing_bytes`), so the figures hold on any machine:
the locally-connected net's grow with the number of boundaries (P - 1) times a halo of each
layer, the fully connected net's with its width times P - 1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import train
from ..core.blocks import crossing_bytes, plan_split
from ..models import mlp
from ..nn import LocallyConnected1d
from .baselines.plain import plain_sgd_examples_per_s
from .common import Benchmark, Log, Row, Sizes, say

BATCH = 32
"""Examples per mini-batch."""
LENGTH = 40
"""Input features (MNIST-1D's signal length)."""
CLASSES = 16
"""Outputs of both nets: as many as the most partitions counted, so every layer splits."""
KERNEL = 3
"""Kernel of the locally-connected layers (padding 1: every layer keeps length 40)."""
TIMED_PARTS = (1, 2)
"""Partitions of the timed runs (2 cores here)."""
DEPTHS = (1, 2, 4)
"""``pipeline_depth`` of the timed runs with 2 partitions (1 partition: depth 1 only)."""
TIMED = ((1, 1), *((2, d) for d in DEPTHS))
"""(partitions, pipeline_depth) of every timed distbelief run, in order."""
ROWS_PER_NET = len(TIMED) + 2
"""Rows of each net: one per timed run, 2 partitions against 1 at depth 1 and at the best."""
COUNTED_PARTS = (1, 2, 4, 8, 16)
"""Partitions whose crossing bytes are counted."""
LR = 0.01
NETS = ("fully connected", "locally connected")


def lc_channels(width: int) -> int:
    """C for a locally-connected net about as large as the fully connected net of width W:
    40 x 3 x C^2 = W^2 per square layer."""
    return max(1, round(width / math.sqrt(LENGTH * KERNEL)))


def fc_net(width: int, seed: int = 0) -> nn.Sequential:
    """The fully connected net: widths 40, W, W, W, W, 16 with ReLU."""
    return mlp((LENGTH, width, width, width, width, CLASSES), seed=seed)


def lc_net(channels: int, seed: int = 0) -> nn.Sequential:
    """The locally-connected net: kernel-3 layers at length 40 (1 -> C, three C -> C, C -> 2)
    with ReLU, then a ``Linear`` 80 -> 16."""
    c, k, n = channels, KERNEL, LENGTH
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Unflatten(1, (1, n))]
        for cin, cout in [(1, c), (c, c), (c, c), (c, c), (c, 2)]:
            layers += [LocallyConnected1d(cin, cout, k, n, padding=k // 2), nn.ReLU()]
        layers += [nn.Flatten(), nn.Linear(2 * n, CLASSES)]
    return nn.Sequential(*layers)


def nets(width: int) -> dict[str, Callable[[int], nn.Sequential]]:
    """Each net's maker (seed -> model), by name."""
    c = lc_channels(width)
    return {NETS[0]: lambda seed: fc_net(width, seed), NETS[1]: lambda seed: lc_net(c, seed)}


def describe(name: str, width: int) -> str:
    """``"FC 40-512x4-16"``, ``"LC 1-47x4-2-16"`` (channels of the locally-connected layers,
    then the classifier's outputs)."""
    if name == NETS[0]:
        return f"FC 40-{width}x4-{CLASSES}"
    return f"LC 1-{lc_channels(width)}x4-2-{CLASSES}"


def examples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random examples of MNIST-1D's input shape with labels of 16 classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, LENGTH, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def counted(width: int) -> dict[str, Any]:
    """Per net: parameters, and the bytes crossing between blocks per step of ``BATCH`` for
    every P in ``COUNTED_PARTS`` (one stage cut into P blocks; float32)."""
    out: dict[str, Any] = {}
    for name, make in nets(width).items():
        model = make(0)
        per_p = {
            p: crossing_bytes(plan_split(list(model), p, (LENGTH,)), BATCH) for p in COUNTED_PARTS
        }
        out[name] = {
            "net": describe(name, width),
            "parameters": sum(q.numel() for q in model.parameters()),
            "bytes_per_step": {str(p): b for p, b in per_p.items()},
        }
    return out


def _per_batch(result: Any) -> float:
    return result.stats["train_s"] / result.stats["steps"]


def _median_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Median of ``a[i] / b[i]`` over the repeats where both sides ran (None if none did)."""
    pairs = [x / y for x, y in zip(a, b, strict=True) if x and y]
    return round(statistics.median(pairs), 3) if pairs else None


def model_parallel(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> dict[str, Any]:
    """Time per mini-batch of each net at each P and in the plain loop, alternating; the bytes
    crossing per step, counted (see the module doc)."""
    width = sizes.model_parallel_width
    data = examples(sizes.model_parallel_steps * BATCH, seed)
    makers = nets(width)
    plain: dict[str, list[float]] = {n: [] for n in makers}
    engine: dict[tuple[str, int, int], list[float | None]] = {
        (n, p, d): [] for n in makers for p, d in TIMED
    }
    for rep in range(repeats):
        for name, make in makers.items():
            ex_s = plain_sgd_examples_per_s(
                make(seed), data, lr=LR, batch_size=BATCH, epochs=1, seed=seed
            )
            plain[name].append(BATCH / ex_s)
            for p, d in TIMED:
                extra = {"pipeline_depth": d} if d > 1 else {}
                result = train(
                    make(seed), data, loss="cross_entropy", lr=LR, batch_size=BATCH, epochs=1,
                    optimizer="sgd", seed=seed, runtime="processes", partitions=p, **extra,
                )  # fmt: skip
                engine[(name, p, d)].append(_per_batch(result))
        say(log, f"model-parallel repeat {rep + 1}/{repeats}: " + ", ".join(
            f"{n} plain {plain[n][-1] * 1e3:.2f} ms"
            + "".join(f", P={p} D={d} {v[-1] * 1e3:.2f} ms" for (m, p, d), v in engine.items()
                      if m == n and v[-1])
            for n in makers
        ))  # fmt: skip
    return _figures(width, plain, engine)


def _ms(samples: Sequence[float | None]) -> float | None:
    """The best run's mean time per mini-batch in ms (other load only ever slows a run)."""
    ran = [v for v in samples if v]
    return round(min(ran) * 1e3, 3) if ran else None


def bytes_figures(width: int) -> dict[str, Any]:
    """The counted part of the figures alone (what :func:`bytes_markdown` and
    :func:`plot_bytes` take): no run, any machine."""
    return {
        "width": width,
        "lc_channels": lc_channels(width),
        "batch": BATCH,
        "classes": CLASSES,
        "counted_partitions": list(COUNTED_PARTS),
        "nets": counted(width),
    }


def _figures(
    width: int,
    plain: dict[str, list[float]],
    engine: dict[tuple[str, int, int], list[float | None]],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        **bytes_figures(width),
        "timed": [],
        "speedup": [],
    }
    for name in NETS:
        for p, d in TIMED:
            samples = engine[(name, p, d)]
            out["timed"].append({
                "net": name, "partitions": p, "pipeline_depth": d, "ran": any(samples),
                "ms_per_batch": _ms(samples), "baseline_ms_per_batch": _ms(plain[name]),
                # throughput ratio: plain loop's time over the engine's
                "ratio": _median_ratio(plain[name], samples),
                "samples_ms": [round(v * 1e3, 3) if v else None for v in samples],
                "baseline_samples_ms": [round(v * 1e3, 3) for v in plain[name]],
            })  # fmt: skip
        one = engine[(name, 1, 1)]
        ratios = {d: _median_ratio(one, engine[(name, 2, d)]) for d in DEPTHS}
        best = max((d for d in DEPTHS if ratios[d] is not None), key=ratios.get, default=1)
        for d, label in ((1, "depth 1"), (best, "best depth")):
            two = engine[(name, 2, d)]
            out["speedup"].append({
                "net": name, "pipeline_depth": d, "which": label, "ran": any(two),
                "ms_per_batch": _ms(two), "baseline_ms_per_batch": _ms(one), "ratio": ratios[d],
            })  # fmt: skip
    return out


def _fmt_ms(value: float | None) -> str:
    return f"{value:.2f} ms/batch" if value is not None else "not run"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "n/a"


def _bytes(n: int) -> str:
    return f"{n:,} B"


def rows(figures: dict[str, Any]) -> list[Row]:
    """A row per net and timed run (P, depth) against the plain loop; two per net for 2
    partitions against 1 (at depth 1, and at the best depth); a row per counted P with both
    nets' crossing bytes (ratio: locally / fully connected)."""
    out: list[Row] = []
    width = figures["width"]
    for t in figures["timed"]:
        p, d = t["partitions"], t.get("pipeline_depth", 1)
        config = f"{describe(t['net'], width)}, sgd, processes, {p} partition" + "s" * (p > 1)
        config += f", pipeline_depth {d}" if d > 1 else ""
        dist = _fmt_ms(t["ms_per_batch"]) if t["ran"] else "did not run"
        out.append(("model-parallel", config, dist,
                    f"plain torch loop {_fmt_ms(t['baseline_ms_per_batch'])}",
                    _ratio(t["ratio"])))  # fmt: skip
    for s in figures["speedup"]:
        d = s.get("pipeline_depth", 1)
        best = " (the best of " + ", ".join(map(str, DEPTHS)) + ")"
        out.append((
            "model-parallel", f"{describe(s['net'], width)}, processes: 2 partitions "
            f"against 1, pipeline_depth {d}{best if s.get('which') == 'best depth' else ''}",
            _fmt_ms(s["ms_per_batch"]) if s["ran"] else "did not run",
            f"1 partition {_fmt_ms(s['baseline_ms_per_batch'])}", _ratio(s["ratio"]),
        ))  # fmt: skip
    fc, lc = (figures["nets"][n] for n in NETS)
    for p in figures["counted_partitions"]:
        a, b = lc["bytes_per_step"][str(p)], fc["bytes_per_step"][str(p)]
        out.append((
            "model-parallel", f"bytes between blocks per step, P = {p}, batch "
            f"{figures['batch']} (counted; ratio LC / FC)",
            f"LC {_bytes(a)}", f"FC {_bytes(b)}", f"{a / b:.3f}" if b else "n/a",
        ))  # fmt: skip
    return out


def bytes_markdown(figures: dict[str, Any]) -> str:
    """The counted bytes as a Markdown table: a row per P, a column per net."""
    fc, lc = (figures["nets"][n] for n in NETS)
    lines = [
        f"| partitions | {fc['net']} ({fc['parameters']:,} parameters) | "
        f"{lc['net']} ({lc['parameters']:,} parameters) | LC / FC |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for p in figures["counted_partitions"]:
        a, b = fc["bytes_per_step"][str(p)], lc["bytes_per_step"][str(p)]
        lines.append(f"| {p} | {a:,} | {b:,} | {f'{b / a:.3f}' if a else '-'} |")
    return "\n".join(lines)


def plot_bytes(figures: dict[str, Any], path: str | Path) -> Path:
    """Draw the counted bytes against P for both nets (a PNG at ``path``, matplotlib's Agg
    backend, as ``distbelief report`` draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = figures["counted_partitions"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, marker in zip(NETS, ("o", "s")):
        net = figures["nets"][name]
        ys = [net["bytes_per_step"][str(p)] / 1024 for p in parts]
        ax.plot(parts, ys, marker=marker, label=f"{net['net']} ({net['parameters']:,} params)")
    ax.set_xticks(parts, [str(p) for p in parts])  # linear: both grow as P - 1
    ax.set_xlabel("partitions P (blocks of one stage; P - 1 boundaries)")
    ax.set_ylabel(f"KiB crossing between blocks per step (batch {figures['batch']})")
    ax.set_title("What crosses between blocks, counted from the plans")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


BENCHMARK = Benchmark("model-parallel", model_parallel, rows)
