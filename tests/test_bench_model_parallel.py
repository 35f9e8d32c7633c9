"""``distbelief bench --only model-parallel`` in its tiny (--quick) configuration: every
comparison is there, its timings finite and positive (not asserted otherwise: a shared
machine), the counted bytes those of the plans, the plot drawn."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from distbelief import bench
from distbelief.bench import model_parallel as mp


def positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report(quick_bench_report: dict[str, Any]) -> dict[str, Any]:
    return quick_bench_report  # every benchmark's, made once for this and test_bench.py


@pytest.mark.slow
@pytest.mark.processes
def test_model_parallel_benchmark_reports_every_comparison(
    report: dict[str, Any], tmp_path: Path
) -> None:
    figures = report["model-parallel"]
    assert figures["width"] == bench.QUICK.model_parallel_width
    long, long_batch = bench.QUICK.model_parallel_long_length, bench.QUICK.model_parallel_long_batch
    shapes = [(40, mp.BATCH), (long, mp.BATCH), (long, long_batch)]
    assert [(s["length"], s["batch"]) for s in figures["sizes"]] == shapes
    assert mp.SIZES == len(shapes)
    lengths = [length for length, _ in shapes]
    # the larger sizes: the same locally-connected channels, on longer signals
    assert len({s["lc_channels"] for s in figures["sizes"]}) == 1
    # as many mini-batches at the larger mini-batch as at 32 (a run's fixed costs weigh less)
    assert figures["sizes"][1]["steps"] == figures["sizes"][2]["steps"]
    timed = [
        (t["length"], t["batch"], t["net"], t["partitions"], t["pipeline_depth"])
        for t in figures["timed"]
    ]
    assert timed == [(n, b, m, p, d) for n, b in shapes for m in mp.NETS for p, d in mp.TIMED]
    for t in figures["timed"]:
        assert t["ran"]
        assert positive(t["baseline_ms_per_batch"])
        if t["ran"]:
            assert positive(t["ms_per_batch"]) and positive(t["ratio"])
    speedups = [(s["length"], s["batch"], s["net"], s["which"]) for s in figures["speedup"]]
    assert speedups == [
        (n, b, m, w) for n, b in shapes for m in mp.NETS for w in ("depth 1", "best depth")
    ]
    for s in figures["speedup"]:
        assert s["ran"] and positive(s["ratio"]) and s["pipeline_depth"] in mp.DEPTHS
    bounds = [(b["length"], b["batch"], b["net"]) for b in figures["bound"]]
    assert bounds == [(n, b, m) for n, b in shapes for m in mp.NETS]
    for b in figures["bound"]:
        assert positive(b["ms_per_batch"]) and positive(b["ratio"])
        assert len(b["samples_ms"]) == report["repeats"]
    assert figures["nets"] == mp.counted(figures["width"])  # counted, so reproducible
    long_width = figures["sizes"][1]["width"]
    assert figures["long_nets"] == mp.counted(long_width, lengths[1])
    for name in mp.NETS:  # the two nets of a size are about as large
        small, large = figures["nets"][name], figures["long_nets"][name]
        assert large["parameters"] > small["parameters"]
    params = [figures["long_nets"][n]["parameters"] for n in mp.NETS]
    assert max(params) < 1.2 * min(params)
    rows = bench.rows({"model-parallel": figures})
    assert len(rows) == len(mp.NETS) * mp.ROWS_PER_NET + len(mp.COUNTED_PARTS)
    assert all(row[0] == "model-parallel" for row in rows)
    assert not any("did not run" in row[2] for row in rows)
    json.dumps(report)
    md = mp.bytes_markdown(figures).splitlines()
    assert len(md) == 2 + len(mp.COUNTED_PARTS) and md[2].startswith("| 1 | 0 | 0 |")
    png = mp.plot_bytes(figures, tmp_path / "bytes.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_parallel_nets_take_mnist1d_shaped_inputs() -> None:

    x, y = mp.examples(8, seed=0)
    assert x.shape == (8, 40) and int(y.max()) < mp.CLASSES
    for make in mp.nets(64).values():
        assert make(0)(x).shape == (8, mp.CLASSES)
    # the larger size: as the issue-25 experiment may build them, by channels and length
    x, _ = mp.examples(4, seed=0, length=160)
    assert mp.lc_net(5, length=160)(x).shape == mp.fc_net(30, length=160)(x).shape == (4, 16)
    assert mp.lc_channels(mp.fc_width(47, 320), 320) == 47
    assert mp.describe(mp.NETS[1], mp.fc_width(47, 320), 320) == "LC 1-47x4-2-16, length 320"
    assert mp.describe(mp.NETS[0], 512) == "FC 40-512x4-16"
    assert mp.describe(mp.NETS[0], 1456, 320, batch=128) == "FC 320-1456x4-16, batch 128"
    assert mp.describe(mp.NETS[1], 1456, 320, batch=128) == "LC 1-47x4-2-16, length 320, batch 128"
    sizes = mp.sizes_of(512, 320, 128)
    assert [s.batch for s in sizes] == [32, 32, 128] and sizes[1].width == sizes[2].width == 1456
    assert mp.size_steps(sizes[0], 192) == 192 and mp.size_steps(sizes[1], 192) == 96
    assert mp.size_steps(sizes[2], 192) == 96 and mp.size_steps(sizes[2], 4) == 2


def test_two_plain_loops_at_once_time_their_slower_half_and_report_a_death() -> None:
    from torch import nn

    from distbelief.bench.baselines.plain import two_plain_loops_s_per_batch

    data = mp.examples(64, seed=0)
    s = two_plain_loops_s_per_batch(lambda seed: mp.fc_net(8, seed), data, lr=0.1,
                                    batch_size=16, seed=0)  # fmt: skip
    assert positive(s)

    def broken(seed: int) -> nn.Module:
        raise ValueError("no model")

    with pytest.raises(RuntimeError, match="died"):
        two_plain_loops_s_per_batch(broken, data, lr=0.1, batch_size=16, seed=0)
