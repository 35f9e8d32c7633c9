"""``pipeline``: the shape of the paper's Figure 3 on one machine. One replica of a
compute-heavy MLP shaped like the paper's speech model: widths 40, W, W, W, W, W, 10 with W =
``pipeline_width`` (four equal square W x W layers between a 40 x W and a W x 10 one), cut after
the second square layer so that each stage does half the work, on data of MNIST-1D's shape;
SGD, mini-batches of 32, one torch thread per process, on the ``processes``
runtime: 1 stage, and 2 stages at ``pipeline_depth`` 1, 2 and 4, each with ``n_fetch = n_push``
1 and 4. Beside: (a) the same net in a plain one-process loop, and (b) torch's own pipelining
(:mod:`.baselines.torch_pipeline`: ``ScheduleGPipe`` and ``Schedule1F1B``, two processes over
gloo, the same cut, micro-batches of 32, 4 per optimizer step). Torch steps its optimizer once
per 4 micro-batches, so it is compared with ``n_push = 4`` (equal update frequency).

Every run alternates with the others in each repeat; ratios are medians of paired ratios. The
bytes that cross the cut per step are counted by the runtime (``stats["wire"]``): activations
forward and their gradient back, ``32 x width x 4`` bytes each, and the targets.

After the timed repeats, 1 stage and 2 stages at the best ``pipeline_depth`` (``n_push`` 1) run
once more with the runtime's profile on (``runtime_options={"profile": True}``, untimed: it
costs a few microseconds a message): where each worker's time went (:func:`breakdown`), a row
per worker.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from ..api import train
from ..models import mlp
from .baselines.plain import plain_sgd_examples_per_s
from .baselines.torch_pipeline import SCHEDULES, split_widths, torch_pipeline_examples_per_s
from .common import Benchmark, Log, Row, Sizes, say

BATCH = 32
"""Mini-batch (distbelief) and micro-batch (torch) size."""
MICROBATCHES = 4
"""Torch's micro-batches per optimizer step; distbelief's ``n_push`` at equal update
frequency."""
DEPTHS = (1, 2, 4)
"""``pipeline_depth`` of the 2-stage runs."""
PUSHES = (1, MICROBATCHES)
"""``n_fetch = n_push`` of every distbelief configuration."""
LR = 0.01
TIMEOUT_S = 300.0
"""Longest a torch baseline may take before its processes are killed and it counts failed."""


def widths(width: int) -> tuple[int, ...]:
    """The benchmark's MLP widths: 40, width x 5, 10 (4 square layers; MNIST-1D's shape)."""
    return (40, width, width, width, width, width, 10)


def examples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of MNIST-1D's shape (40 features, 10 classes), random: examples/s do not
    depend on the values, and generating MNIST-1D itself takes seconds."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def configs() -> list[tuple[int, int, int]]:
    """(stages, pipeline_depth, n_push) of every distbelief run, in order."""
    return [(s, d, p) for p in PUSHES for s, d in [(1, 1), *((2, d) for d in DEPTHS)]]


def label(stages: int, depth: int, n_push: int) -> str:
    """``"2 stages, depth 4, n_push 4"``."""
    text = "1 stage" if stages == 1 else f"{stages} stages, pipeline_depth {depth}"
    return f"{text}, n_fetch = n_push = {n_push}"


def _median_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Median of ``a[i] / b[i]`` over the repeats where both sides ran (None if none did)."""
    pairs = [x / y for x, y in zip(a, b, strict=True) if x and y]
    return round(statistics.median(pairs), 3) if pairs else None


def pipeline(sizes: Sizes, repeats: int, log: Log = None, seed: int = 0) -> dict[str, Any]:
    """Examples/s of every configuration, alternating, and the ratios (see the module doc)."""
    net = widths(sizes.pipeline_width)
    cut = split_widths(net)
    data = examples(sizes.pipeline_steps * BATCH, seed)
    runs = configs()
    engine: dict[tuple, list[float | None]] = {c: [] for c in runs}
    plain: list[float] = []
    torch_runs: dict[str, list[float | None]] = {s: [] for s in SCHEDULES}
    torch_errors: dict[str, str] = {}
    cut_bytes: list[float] = []
    for rep in range(repeats):
        plain.append(plain_sgd_examples_per_s(
            mlp(net, seed=seed), data, lr=LR, batch_size=BATCH, epochs=1, seed=seed
        ))  # fmt: skip
        for stages, depth, n_push in runs:
            result = train(
                mlp(net, seed=seed), data, loss="cross_entropy", lr=LR, batch_size=BATCH,
                epochs=1, stages=[cut] if stages == 2 else 1, optimizer="sgd", n_fetch=n_push,
                n_push=n_push, seed=seed, runtime="processes", pipeline_depth=depth,
            )  # fmt: skip
            engine[(stages, depth, n_push)].append(result.stats["examples_per_s"])
            if stages == 2:
                wire = result.stats["wire"]
                moved = wire["slot_bytes"] + wire["pickled_tensor_bytes"]
                cut_bytes.append(moved / result.stats["steps"])
        for schedule in SCHEDULES:
            out = torch_pipeline_examples_per_s(
                mlp(net, seed=seed), cut, data, schedule=schedule, lr=LR, microbatch=BATCH,
                n_microbatches=MICROBATCHES, steps=sizes.pipeline_steps // MICROBATCHES - 1,
                timeout_s=TIMEOUT_S,
            )  # fmt: skip
            torch_runs[schedule].append(out.get("examples_per_s"))
            if not out["ok"]:
                torch_errors[schedule] = out["error"]
        say(log, f"pipeline repeat {rep + 1}/{repeats}: plain {plain[-1]:,.0f} ex/s, " + ", ".join(
            f"{label(*c)} {v[-1]:,.0f}" for c, v in engine.items() if v[-1]
        ) + ", " + ", ".join(
            f"torch {s} {v[-1]:,.0f}" if v[-1] else f"torch {s} failed"
            for s, v in torch_runs.items()
        ))  # fmt: skip
    out = _figures(net, cut, engine, plain, torch_runs, torch_errors, cut_bytes)
    best = out["speedup"][0]["best_depth"] or 1
    out["profile"] = {}
    for stages, depth in ((1, 1), (2, best)):
        extra = {"pipeline_depth": depth} if depth != 1 else {}
        result = train(
            mlp(net, seed=seed), data, loss="cross_entropy", lr=LR, batch_size=BATCH,
            epochs=1, stages=[cut] if stages == 2 else 1, optimizer="sgd", n_fetch=1, n_push=1,
            seed=seed, runtime="processes", runtime_options={"profile": True}, **extra,
        )  # fmt: skip
        out["profile"][label(stages, depth, 1)] = breakdown(result.stats["profile"])
    return out


def _best(samples: list[float | None]) -> int | None:
    ran = [v for v in samples if v]
    return round(max(ran)) if ran else None


def _figures(
    net: tuple[int, ...],
    cut: int,
    engine: dict[tuple, list[float | None]],
    plain: list[float],
    torch_runs: dict[str, list[float | None]],
    torch_errors: dict[str, str],
    cut_bytes: list[float],
) -> dict[str, Any]:
    width = net[1]
    out: dict[str, Any] = {
        "widths": list(net),
        "cut_after_layer": cut,
        "batch": BATCH,
        "n_microbatches": MICROBATCHES,
        "cut_bytes_per_step_expected": BATCH * width * 4 * 2,
        "cut_bytes_per_step": round(statistics.median(cut_bytes)) if cut_bytes else None,
        "baseline_examples_per_s": round(max(plain)),
        "baseline_samples": [round(v) for v in plain],
        "configs": [],
        "speedup": [],
        "torch": [],
    }
    for (stages, depth, n_push), samples in engine.items():
        out["configs"].append({
            "config": label(stages, depth, n_push), "stages": stages, "pipeline_depth": depth,
            "n_push": n_push, "ran": any(samples), "examples_per_s": _best(samples),
            "ratio": _median_ratio(samples, plain),
            "samples": [round(v) if v else None for v in samples],
        })  # fmt: skip
    for n_push in PUSHES:
        one = engine[(1, 1, n_push)]
        by_depth = {d: _median_ratio(engine[(2, d, n_push)], one) for d in DEPTHS}
        ran = {d: r for d, r in by_depth.items() if r is not None}
        best = max(ran, key=ran.__getitem__) if ran else None
        out["speedup"].append({
            "n_push": n_push, "best_depth": best, "ratio": ran.get(best), "by_depth": by_depth,
            "examples_per_s": _best(engine[(2, best, n_push)]) if best else None,
            "baseline_examples_per_s": _best(one),
        })  # fmt: skip
    for schedule, samples in torch_runs.items():
        by_depth = {d: _median_ratio(engine[(2, d, MICROBATCHES)], samples) for d in DEPTHS}
        ran = {d: r for d, r in by_depth.items() if r is not None}
        best = max(ran, key=ran.__getitem__) if ran else None
        out["torch"].append({
            "schedule": schedule, "ok": any(samples), "error": torch_errors.get(schedule),
            "examples_per_s": _best(samples), "best_depth": best, "ratio": ran.get(best),
            "by_depth": by_depth,
            "distbelief_examples_per_s": _best(engine[(2, best, MICROBATCHES)]) if best else None,
            "samples": [round(v) if v else None for v in samples],
        })  # fmt: skip
    return out


def _ex(value: int | None) -> str:
    return f"{value:,} ex/s" if value else "not run"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "n/a"


def rows(figures: dict[str, Any]) -> list[Row]:
    """A row per distbelief configuration (against the plain loop), a row per ``n_push`` for 2
    stages at their best depth against 1 stage, a row per torch schedule."""
    net = f"40-{figures['widths'][1]}x5-10"
    cut = f"{figures['cut_bytes_per_step'] or figures['cut_bytes_per_step_expected']:,} B"
    out: list[Row] = []
    plain = f"plain torch loop {figures['baseline_examples_per_s']:,} ex/s"
    for c in figures["configs"]:
        dist = _ex(c["examples_per_s"]) if c["ran"] else "did not run"
        out.append(("pipeline", f"MLP {net}, sgd, processes, {c['config']}", dist, plain,
                    _ratio(c["ratio"])))  # fmt: skip
    for s in figures["speedup"]:
        out.append((
            "pipeline", f"2 stages (best pipeline_depth: {s['best_depth']}) against 1 stage, "
            f"n_fetch = n_push = {s['n_push']}, cut {cut}/step",
            _ex(s["examples_per_s"]), f"1 stage {_ex(s['baseline_examples_per_s'])}",
            _ratio(s["ratio"]),
        ))  # fmt: skip
    for t in figures["torch"]:
        base = f"torch {t['schedule']} {_ex(t['examples_per_s'])}" if t["ok"] else (
            f"torch {t['schedule']} failed"
        )  # fmt: skip
        out.append((
            "pipeline", f"2 stages (best pipeline_depth: {t['best_depth']}), n_fetch = n_push "
            f"= {figures['n_microbatches']}, against torch.distributed.pipelining "
            f"{t['schedule']}, {figures['n_microbatches']} micro-batches of {figures['batch']}",
            _ex(t["distbelief_examples_per_s"]), base, _ratio(t["ratio"]),
        ))  # fmt: skip
    for config, workers in figures.get("profile", {}).items():
        for worker, parts in workers.items():
            out.append((
                "pipeline", f"profile, {config}: {worker} ({', '.join(parts['hosts'])})",
                breakdown_text(parts),
                f"span {parts['span_s']:.2f} s, CPU {parts['cpu_s']:.2f} s, "
                f"{parts['page_faults']:,} page faults",
                "",
            ))  # fmt: skip
    return out


BENCHMARK = Benchmark("pipeline", pipeline, rows)


CATEGORIES = ("compute", "shards", "data", "actors", "wire", "lock_wait", "idle", "loop")
"""Where a worker's span goes (:func:`breakdown`)."""
KIND_CATEGORY = {"Stage": "compute", "ParameterShard": "shards", "DataShard": "data"}


def breakdown(profile: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A run's ``stats["profile"]`` (``runtime_options={"profile": True}`` on ``processes``)
    grouped, per worker, into seconds of its span: ``compute`` (the stages' handlers: the
    layers' forward and backward passes, and copying fetched values into a stashed version),
    ``shards`` (the parameter shards' handlers run in this process: fetches and pushes, the
    update rule), ``data`` (the data shard), ``actors`` (any other), ``wire`` (pickling, slot
    copies, unpickling), ``lock_wait`` (for a shard's lock), ``idle`` (waiting for mail) and
    ``loop`` (the rest: the run loop itself); with ``span_s``, ``cpu_s`` (the process's) and
    ``page_faults`` (the process's over the span)."""
    out: dict[str, dict[str, Any]] = {}
    for worker, p in profile.items():
        if worker == "driver":
            continue
        parts = dict.fromkeys(CATEGORIES, 0.0)
        for actor in p["actors"].values():
            category = KIND_CATEGORY.get(actor["kind"], "actors")
            parts[category] += sum(t["wall_s"] for t in actor["handlers"].values())
        parts["wire"] = p["send"]["wall_s"] + p["receive"]["wall_s"]
        parts["lock_wait"] = p["lock_wait"]["wall_s"]
        parts["idle"] = p["idle"]["wall_s"]
        parts["loop"] = p["other_s"]
        out[worker] = {
            "hosts": p["hosts"], "span_s": p["span_s"], "cpu_s": p["process_cpu_s"],
            "page_faults": p["page_faults"],
            **{k: round(v, 4) for k, v in parts.items()},
        }  # fmt: skip
    return out


def breakdown_text(parts: dict[str, Any]) -> str:
    """``"compute 61%, shards 14%, ..."``: a worker's :func:`breakdown` in shares of its span."""
    span = parts["span_s"] or 1.0
    return ", ".join(f"{k} {100 * parts[k] / span:.0f}%" for k in CATEGORIES if parts[k] > 0)
