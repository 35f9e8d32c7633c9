"""``model-parallel``: the shape of the paper's Figure 3 with partitions (a stage's layers cut
into blocks of units, one actor per block; issue 23, docs/partitions.md). Pairs of nets of about
the same parameter count, on signals of length L (random values: time per step does not depend
on them) with 16 classes, so that every layer, the classifier too, splits 16 ways:

- fully connected: widths L, W, W, W, W, 16;
- locally connected: ``LocallyConnected1d`` layers of kernel 3 at full length L (1 -> C, then
  three C -> C, then C -> 2) and a ``Linear`` 2L -> 16, with C ~ W / sqrt(3L) so that its
  three square layers (L x 3 x C^2 weights each) hold what the fully connected net's three
  W x W layers hold.

Three sizes, as Figure 3 plots several models: MNIST-1D's length 40 with W =
``model_parallel_width`` (C = 47 at W = 512), and the same locally-connected stack (the same C)
on signals of ``model_parallel_long_length`` (320: 8 times the compute per step) with a fully
connected net as large (W = 1456 at length 320), at mini-batches of 32 and of
``model_parallel_long_batch`` (128: 4 times the compute again, for the same parameters to
fetch and push and the same number of messages). A block's compute grows with the length and
the mini-batch while what it costs to fetch, push and exchange a message's envelope does not,
so the larger locally-connected net should gain more, and more at the larger mini-batch.

(a) **Timed**: mean time per mini-batch (SGD, one replica, one stage, one shard, one torch
thread per process) on the ``processes`` runtime with P = 1 and 2 partitions, beside the same
net in a plain one-process torch loop, for every net of every size (the larger size's runs
take half as many mini-batches, of 32 and of 128); every run alternates with
the others in each repeat and ratios are medians of paired ratios. With 2 partitions also at
``pipeline_depth`` 2 and 4 (a block computes one mini-batch while it waits for another's
halo; each backward pass uses its forward's parameters, one to three steps stale): the rows
say which depth, and the last speedup row of each net is the best depth's. The headline
(depth 1) is SGD every step, as the plain loop.

Beside them, **the machine's bound**: the same net in two plain loops at once (two processes,
one torch thread each), each over half of every mini-batch, against one loop over whole
mini-batches: what 2 cores give for the same work when nothing passes between them. Two
busy cores of a virtual machine can slow each other (shared caches, memory, the host), so
the bound may be under 2.0; 2 partitions against 1 can approach it (and pass it a little:
each loop steps all the parameters, a block only its half).

(b) **Counted**: the bytes that cross between blocks per step for P in {1, 2, 4, 8, 16}, from
the plans (:func:`~distbelief.core.blocks.crossing_bytes`), so the figures hold on any machine:
the locally-connected net's grow with the number of boundaries (P - 1) times a halo of each
layer, the fully connected net's with its width times P - 1 (both sizes; the larger pair's in
the same rows, in brackets).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..api import train
from ..core.blocks import crossing_bytes, plan_split
from ..models import mlp
from ..nn import LocallyConnected1d
from .baselines.plain import plain_sgd_examples_per_s, two_plain_loops_s_per_batch
from .common import Benchmark, Log, Row, Sizes, say

BATCH = 32
"""Examples per mini-batch (of the counted bytes, and of the first two sizes' timed runs)."""
LENGTH = 40
"""Input features (MNIST-1D's signal length)."""
CLASSES = 16
"""Outputs of both nets: as many as the most partitions counted, so every layer splits."""
KERNEL = 3
"""Kernel of the locally-connected layers (padding 1: every layer keeps length 40)."""
LONG_STEPS = 2
"""The larger size's runs take ``model_parallel_steps // LONG_STEPS`` mini-batches, of 32 and
of the larger mini-batch alike (:func:`size_steps`)."""
SIZES = 3
"""Sizes of each net: length 40; ``model_parallel_long_length``; the same at
``model_parallel_long_batch``."""
TIMED_PARTS = (1, 2)
"""Partitions of the timed runs (2 cores here)."""
DEPTHS = (1, 2, 4)
"""``pipeline_depth`` of the timed runs with 2 partitions (1 partition: depth 1 only)."""
TIMED = ((1, 1), *((2, d) for d in DEPTHS))
"""(partitions, pipeline_depth) of every timed distbelief run, in order."""
ROWS_PER_NET = SIZES * (len(TIMED) + 3)
"""Rows of each net (over its sizes): per size one per timed run, the machine's bound (two
plain loops at once), and 2 partitions against 1 at depth 1 and at the best depth."""
COUNTED_PARTS = (1, 2, 4, 8, 16)
"""Partitions whose crossing bytes are counted."""
LR = 0.01
NETS = ("fully connected", "locally connected")


def lc_channels(width: int, length: int = LENGTH) -> int:
    """C for a locally-connected net about as large as the fully connected net of width W on
    signals of ``length``: ``length`` x 3 x C^2 = W^2 per square layer."""
    return max(1, round(width / math.sqrt(length * KERNEL)))


def fc_width(channels: int, length: int = LENGTH) -> int:
    """W for a fully connected net about as large as the locally-connected net of C channels
    on signals of ``length`` (the inverse of :func:`lc_channels`)."""
    return max(1, round(channels * math.sqrt(length * KERNEL)))


def fc_net(
    width: int, seed: int = 0, length: int = LENGTH, classes: int = CLASSES
) -> nn.Sequential:
    """The fully connected net: widths ``length`` (40), W, W, W, W, ``classes`` (16) with
    ReLU."""
    return mlp((length, width, width, width, width, classes), seed=seed)


def lc_net(
    channels: int, seed: int = 0, length: int = LENGTH, classes: int = CLASSES
) -> nn.Sequential:
    """The locally-connected net: kernel-3 layers at full ``length`` (40; 1 -> C, three
    C -> C, C -> 2) with ReLU, then a ``Linear`` 2 x length -> ``classes`` (16)."""
    c, k, n = channels, KERNEL, length
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Unflatten(1, (1, n))]
        for cin, cout in [(1, c), (c, c), (c, c), (c, c), (c, 2)]:
            layers += [LocallyConnected1d(cin, cout, k, n, padding=k // 2), nn.ReLU()]
        layers += [nn.Flatten(), nn.Linear(2 * n, classes)]
    return nn.Sequential(*layers)


def nets(
    width: int, length: int = LENGTH, classes: int = CLASSES
) -> dict[str, Callable[[int], nn.Sequential]]:
    """Each net's maker (seed -> model), by name, on signals of ``length`` with ``classes``
    outputs (a P above 16 needs more: every layer, the classifier too, is cut P ways)."""
    c = lc_channels(width, length)
    return {
        NETS[0]: lambda seed: fc_net(width, seed, length, classes),
        NETS[1]: lambda seed: lc_net(c, seed, length, classes),
    }


class Size(NamedTuple):
    """One size of the timed nets."""

    width: int
    """The fully connected net's width W (the locally-connected net is sized to match)."""
    length: int
    """Signal length L."""
    batch: int = BATCH
    """Examples per mini-batch of its timed runs."""


def sizes_of(width: int, long_length: int, long_batch: int | None = None) -> list[Size]:
    """Each size: length 40 at ``width``; ``long_length`` with the same locally-connected
    channels and the fully connected width that matches them; with ``long_batch``, the same
    again at mini-batches of ``long_batch``."""
    long = Size(fc_width(lc_channels(width), long_length), long_length)
    return [Size(width, LENGTH), long] + ([long._replace(batch=long_batch)] if long_batch else [])


def describe(
    name: str, width: int, length: int = LENGTH, classes: int = CLASSES, batch: int = BATCH
) -> str:
    """``"FC 40-512x4-16"``, ``"LC 1-47x4-2-16"`` (channels of the locally-connected layers,
    then the classifier's outputs; ``", length 320"`` after it on longer signals, and
    ``", batch 128"`` at a mini-batch other than 32)."""
    tail = f", batch {batch}" if batch != BATCH else ""
    if name == NETS[0]:
        return f"FC {length}-{width}x4-{classes}{tail}"
    tail = (f", length {length}" if length != LENGTH else "") + tail
    return f"LC 1-{lc_channels(width, length)}x4-2-{classes}{tail}"


def examples(
    n: int, seed: int, length: int = LENGTH, classes: int = CLASSES
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random examples of ``length`` features (MNIST-1D's 40) with labels of
    ``classes`` (16) classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, generator=g), torch.randint(0, classes, (n,), generator=g)


def counted(width: int, length: int = LENGTH) -> dict[str, Any]:
    """Per net: parameters, and the bytes crossing between blocks per step of ``BATCH`` for
    every P in ``COUNTED_PARTS`` (one stage cut into P blocks; float32)."""
    out: dict[str, Any] = {}
    for name, make in nets(width, length).items():
        model = make(0)
        per_p = {
            p: crossing_bytes(plan_split(list(model), p, (length,)), BATCH) for p in COUNTED_PARTS
        }
        out[name] = {
            "net": describe(name, width, length),
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


Key = tuple[str, Size, int, int]
"""(net, size, partitions, pipeline_depth) of a timed run."""


def size_steps(size: Size, steps: int) -> int:
    """Mini-batches of a timed run of ``size``: ``steps`` (``model_parallel_steps``) at length
    40, ``LONG_STEPS`` times fewer on longer signals, at either mini-batch (at least 2). Not
    fewer again at the larger mini-batch: a run's fixed costs (its first fetch, filling and
    draining a pipeline of 2 partitions) cost 3-5% more of a 2-partition run's time per
    mini-batch over 48 mini-batches of 128 than over 144 (docs/partitions.md), and the figure is
    the time per mini-batch of a run under way, as Figure 3's."""
    if size.length == LENGTH:
        return steps
    return max(2, steps // LONG_STEPS)


def model_parallel(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> dict[str, Any]:
    """Time per mini-batch of each net of each size at each P and in the plain loop,
    alternating; the bytes crossing per step, counted (see the module doc)."""
    width = sizes.model_parallel_width
    sized = sizes_of(width, sizes.model_parallel_long_length, sizes.model_parallel_long_batch)
    steps = {size: size_steps(size, sizes.model_parallel_steps) for size in sized}
    data = {size: examples(steps[size] * size.batch, seed, size.length) for size in sized}
    makers = {(n, size): make for size in sized for n, make in nets(*size[:2]).items()}
    plain: dict[tuple[str, Size], list[float]] = {k: [] for k in makers}
    pair: dict[tuple[str, Size], list[float]] = {k: [] for k in makers}
    engine: dict[Key, list[float | None]] = {
        (n, size, p, d): [] for n, size in makers for p, d in TIMED
    }
    for rep in range(repeats):
        for (name, size), make in makers.items():
            batch = size.batch
            ex_s = plain_sgd_examples_per_s(
                make(seed), data[size], lr=LR, batch_size=batch, epochs=1, seed=seed
            )
            plain[name, size].append(batch / ex_s)
            pair[name, size].append(two_plain_loops_s_per_batch(
                make, data[size], lr=LR, batch_size=batch, seed=seed
            ))  # fmt: skip
            for p, d in TIMED:
                extra = {"pipeline_depth": d} if d > 1 else {}
                result = train(
                    make(seed), data[size], loss="cross_entropy", lr=LR, batch_size=batch,
                    epochs=1, optimizer="sgd", seed=seed, runtime="processes", partitions=p,
                    **extra,
                )  # fmt: skip
                engine[name, size, p, d].append(_per_batch(result))
        say(log, f"model-parallel repeat {rep + 1}/{repeats}: " + ", ".join(
            f"{n} L={size.length} B={size.batch} plain {plain[n, size][-1] * 1e3:.2f} ms"
            + "".join(f", P={p} D={d} {v[-1] * 1e3:.2f} ms"
                      for (m, sz, p, d), v in engine.items() if (m, sz) == (n, size) and v[-1])
            for n, size in makers
        ))  # fmt: skip
    return _figures(width, sized, steps, plain, pair, engine)


def _ms(samples: Sequence[float | None]) -> float | None:
    """The best run's mean time per mini-batch in ms (other load only ever slows a run)."""
    ran = [v for v in samples if v]
    return round(min(ran) * 1e3, 3) if ran else None


def bytes_figures(width: int, long_length: int | None = None) -> dict[str, Any]:
    """The counted part of the figures alone (what :func:`bytes_markdown` and
    :func:`plot_bytes` take): no run, any machine. With ``long_length``, the larger pair's
    counts too (``"long_nets"``)."""
    out = {
        "width": width,
        "lc_channels": lc_channels(width),
        "batch": BATCH,
        "classes": CLASSES,
        "counted_partitions": list(COUNTED_PARTS),
        "nets": counted(width),
    }
    if long_length is not None:
        long_width = sizes_of(width, long_length)[1].width
        out["long_nets"] = counted(long_width, long_length)
    return out


def _figures(
    width: int,
    sized: list[Size],
    steps: dict[Size, int],
    plain: dict[tuple[str, Size], list[float]],
    pair: dict[tuple[str, Size], list[float]],
    engine: dict[Key, list[float | None]],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        **bytes_figures(width, sized[1].length),
        "sizes": [
            {
                "width": size.width,
                "length": size.length,
                "batch": size.batch,
                "lc_channels": lc_channels(size.width, size.length),
                "steps": steps[size],
            }
            for size in sized
        ],  # fmt: skip
        "timed": [],
        "bound": [],
        "speedup": [],
    }
    for size in sized:
        w, length, batch = size
        for name in NETS:
            base = plain[name, size]
            for p, d in TIMED:
                samples = engine[name, size, p, d]
                out["timed"].append({
                    "net": name, "width": w, "length": length, "batch": batch, "partitions": p,
                    "pipeline_depth": d, "ran": any(samples),
                    "ms_per_batch": _ms(samples), "baseline_ms_per_batch": _ms(base),
                    # throughput ratio: plain loop's time over the engine's
                    "ratio": _median_ratio(base, samples),
                    "samples_ms": [round(v * 1e3, 3) if v else None for v in samples],
                    "baseline_samples_ms": [round(v * 1e3, 3) for v in base],
                })  # fmt: skip
            out["bound"].append({
                "net": name, "width": w, "length": length, "batch": batch,
                "ms_per_batch": _ms(pair[name, size]), "baseline_ms_per_batch": _ms(base),
                "ratio": _median_ratio(base, pair[name, size]),
                "samples_ms": [round(v * 1e3, 3) for v in pair[name, size]],
            })  # fmt: skip
            one = engine[name, size, 1, 1]
            ratios = {d: _median_ratio(one, engine[name, size, 2, d]) for d in DEPTHS}
            best = max((d for d in DEPTHS if ratios[d] is not None), key=ratios.get, default=1)
            for d, label in ((1, "depth 1"), (best, "best depth")):
                two = engine[name, size, 2, d]
                out["speedup"].append({
                    "net": name, "width": w, "length": length, "batch": batch,
                    "pipeline_depth": d, "which": label, "ran": any(two),
                    "ms_per_batch": _ms(two), "baseline_ms_per_batch": _ms(one),
                    "ratio": ratios[d],
                })  # fmt: skip
    return out


def _fmt_ms(value: float | None) -> str:
    return f"{value:.2f} ms/batch" if value is not None else "not run"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "n/a"


def _bytes(n: int) -> str:
    return f"{n:,} B"


def rows(figures: dict[str, Any]) -> list[Row]:
    """Per size and net, a row per timed run (P, depth) against the plain loop, one for the
    machine's bound (two plain loops at once against one) and two for 2 partitions against 1
    (at depth 1, and at the best depth); a row per counted P with both
    nets' crossing bytes (ratio: locally / fully connected; the larger pair's in brackets)."""
    out: list[Row] = []
    width = figures["width"]
    for t in figures["timed"]:
        p, d = t["partitions"], t.get("pipeline_depth", 1)
        net = describe(t["net"], t.get("width", width), t.get("length", LENGTH),
                       batch=t.get("batch", BATCH))  # fmt: skip
        config = f"{net}, sgd, processes, {p} partition" + "s" * (p > 1)
        config += f", pipeline_depth {d}" if d > 1 else ""
        dist = _fmt_ms(t["ms_per_batch"]) if t["ran"] else "did not run"
        out.append(("model-parallel", config, dist,
                    f"plain torch loop {_fmt_ms(t['baseline_ms_per_batch'])}",
                    _ratio(t["ratio"])))  # fmt: skip
    for b in figures.get("bound", ()):
        net = describe(b["net"], b["width"], b["length"], batch=b["batch"])
        out.append((
            "model-parallel", f"{net}: two plain torch loops at once, each on half of every "
            "mini-batch (2 cores on the same work, nothing exchanged: what 2 partitions "
            "against 1 can approach)", _fmt_ms(b["ms_per_batch"]),
            f"one plain torch loop {_fmt_ms(b['baseline_ms_per_batch'])}", _ratio(b["ratio"]),
        ))  # fmt: skip
    for s in figures["speedup"]:
        d = s.get("pipeline_depth", 1)
        net = describe(s["net"], s.get("width", width), s.get("length", LENGTH),
                       batch=s.get("batch", BATCH))  # fmt: skip
        best = " (the best of " + ", ".join(map(str, DEPTHS)) + ")"
        out.append((
            "model-parallel", f"{net}, processes: 2 partitions "
            f"against 1, pipeline_depth {d}{best if s.get('which') == 'best depth' else ''}",
            _fmt_ms(s["ms_per_batch"]) if s["ran"] else "did not run",
            f"1 partition {_fmt_ms(s['baseline_ms_per_batch'])}", _ratio(s["ratio"]),
        ))  # fmt: skip
    fc, lc = (figures["nets"][n] for n in NETS)
    long = figures.get("long_nets")
    for p in figures["counted_partitions"]:
        a, b = lc["bytes_per_step"][str(p)], fc["bytes_per_step"][str(p)]
        lc_text, fc_text = f"LC {_bytes(a)}", f"FC {_bytes(b)}"
        if long is not None:
            fc_long, lc_long = (long[n] for n in NETS)
            lc_text += f" ({lc_long['net']}: {_bytes(lc_long['bytes_per_step'][str(p)])})"
            fc_text += f" ({fc_long['net']}: {_bytes(fc_long['bytes_per_step'][str(p)])})"
        out.append((
            "model-parallel", f"bytes between blocks per step, P = {p}, batch "
            f"{figures['batch']} (counted; ratio LC / FC)",
            lc_text, fc_text, f"{a / b:.3f}" if b else "n/a",
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
