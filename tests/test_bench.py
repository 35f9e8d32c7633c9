"""The benchmarks run end to end in their tiny (--quick) configuration: every comparison is
there and its figures are finite and positive. The figures themselves (timings taken on a
shared machine) are not asserted, nor is the report's own arithmetic re-derived."""

from __future__ import annotations

import json
import math
import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from distbelief import bench
from distbelief.bench import model_parallel, pipeline
from distbelief.bench.baselines.torch_pipeline import SCHEDULES, torch_pipeline_examples_per_s
from distbelief.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(quick_bench_report: dict[str, Any]) -> dict[str, Any]:
    return quick_bench_report


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_benchmark_reports_a_ratio(report: dict[str, Any]) -> None:
    assert report["quick"] and report["machine"]["cpus"] >= 1
    overhead = report["overhead"]
    assert [(r["replicas"], r["stages"], r["shards"]) for r in overhead] == [
        (1, 1, 1), (1, 2, 1), (4, 1, 2)
    ]  # fmt: skip
    for r in overhead:
        assert positive(r["examples_per_s"]) and positive(r["baseline_examples_per_s"])
        assert positive(r["ratio"])
    scaling = report["scaling"]
    assert [r["replicas"] for r in scaling] == list(bench.QUICK.scaling_replicas)
    for r in scaling:
        assert positive(r["examples_per_s"]) and positive(r["ratio_to_first"])
        assert r["peak_rss_mb"] > 10
    (shard,) = report["shard"]
    assert shard["parameters"] == bench.QUICK.shard_sizes[0]
    assert positive(shard["pushes_per_s"]) and positive(shard["ratio"])
    assert [(x["stages"], x["shards"]) for x in report["xor"]] == [(1, 1), (2, 2)]
    for xor in report["xor"]:
        assert xor["examples"] == bench.QUICK.xor_examples and positive(xor["ratio"])
        assert positive(xor["train_s"]) and positive(xor["baseline_s"])
    assert [r["shard_updates"] for r in report["hogwild"]] == ["locked", "hogwild"]
    for hogwild in report["hogwild"]:
        assert hogwild["replicas"] == 2 and "processes" in hogwild["config"]
        assert positive(hogwild["examples_per_s"]) and positive(hogwild["baseline_examples_per_s"])
        assert positive(hogwild["ratio"])
    sb = report["sandblaster"]
    assert sb["time_to_accuracy"]["target"] == 0.60
    assert [r["portions"] for r in sb["straggler"]] == [32, 4]
    for r in sb["straggler"]:
        assert positive(r["slowed_s"]) and positive(r["unslowed_s"]) and positive(r["ratio"])
        assert len(r["portions_done_slowed"]) == 4
    on = sb["straggler"][0]["portions_done_slowed"]
    assert on[3] < min(on[:3])  # the slowed replica computed fewer portions
    assert [r["parameters"] > 0 and r["bytes_per_step"] > 0 for r in sb["coordinator"]] == [
        True
    ] * len(bench.QUICK.coordinator_hidden)
    (ckpt,) = report["checkpoint"]
    assert ckpt["checkpoint_every"] == bench.QUICK.checkpoint_every[0]
    assert ckpt["checkpoints_written"] >= 2  # periodic ones and the final one
    assert positive(ckpt["examples_per_s"]) and positive(ckpt["ratio"])
    json.dumps(report)  # serialisable as the --json output


@pytest.mark.slow
def test_table_and_markdown_have_one_row_per_comparison(report: dict[str, Any]) -> None:
    n = 3 + len(bench.QUICK.scaling_replicas) + len(bench.QUICK.shard_sizes) + 2
    n += len(bench.HOGWILD_MODES)
    n += 1 + 2 + len(bench.QUICK.coordinator_hidden)  # sandblaster
    n += len(bench.QUICK.checkpoint_every)
    n += len(pipeline.configs()) + len(pipeline.PUSHES) + len(SCHEDULES)
    n += len(model_parallel.NETS) * model_parallel.ROWS_PER_NET
    n += len(model_parallel.COUNTED_PARTS)
    n += 1 + 2  # the pipeline's profile: a row per worker, of 1 stage and of 2
    assert bench.table(report).row_count == n
    md = bench.markdown(report).splitlines()
    assert md[0].startswith("`distbelief bench --quick") and "cpus" in md[0]
    assert len([line for line in md if line.startswith("| ")]) == n + 2  # + header, rule


@pytest.mark.slow  # (the fast tier stays under a minute)
def test_shard_benchmark_applies_every_push() -> None:
    grads = [torch.randn(1000) for _ in range(2)]
    assert bench.shard_pushes_per_s(1000, 7, grads, 0.1) > 0  # raises if a push was lost


def test_only_parses() -> None:
    # An unknown name is refused by the command: test_cli's test_bench_rejects_unknown_benchmark.
    assert bench.parse_only(None) == bench.BENCHMARKS
    assert bench.parse_only("xor, shard") == ("xor", "shard")


def test_the_registry_is_the_one_list_of_benchmarks() -> None:
    assert bench.BENCHMARKS == (
        "overhead", "scaling", "shard", "xor", "hogwild", "sandblaster", "checkpoint", "pipeline",
        "model-parallel",
    )  # fmt: skip
    help_text = bench.only_help()
    assert "\n" not in help_text
    assert help_text.endswith(", ".join(bench.BENCHMARKS) + ".")
    with pytest.raises(ValueError, match="choose from " + ", ".join(bench.BENCHMARKS)):
        bench.parse_only("speed")


def test_baselines_are_part_of_the_package() -> None:
    # Nothing is loaded from the source checkout (benchmarks/): an installed wheel has it all.
    from distbelief.bench.baselines import hogwild, plain

    for module in (hogwild, plain):
        assert Path(module.__file__).resolve().is_relative_to(Path(bench.__file__).parent)
    assert callable(hogwild.hogwild) and callable(plain.plain_sgd_examples_per_s)


def test_cli_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--only", "shard", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "shard" in out and "overhead" not in out
    assert out["command"] == "distbelief bench --quick --only shard"


@pytest.mark.slow
def test_benchmarks_run_script() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "shard",
         "--markdown"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| PS shard | 10,000 parameters, adagrad |" in proc.stdout


@pytest.mark.slow
def test_pipeline_benchmark_reports_every_configuration_and_both_torch_schedules():
    report = bench.run(["pipeline"], quick=True)
    figures = report["pipeline"]
    width = bench.QUICK.pipeline_width
    assert figures["widths"] == [40, *[width] * 5, 10] and figures["cut_after_layer"] == 6
    runs = [(c["stages"], c["pipeline_depth"], c["n_push"]) for c in figures["configs"]]
    assert runs == pipeline.configs()
    assert (1, 1, 1) in runs and (2, 4, 4) in runs and (1, 2, 1) not in runs
    for c in figures["configs"]:
        assert c["ran"] and positive(c["examples_per_s"]) and positive(c["ratio"])
    # The cut carries each step's activations forward and their gradient back (32 x width
    # floats each) and the targets (32 int64).
    assert figures["cut_bytes_per_step_expected"] == 32 * width * 4 * 2
    assert figures["cut_bytes_per_step"] == 32 * width * 4 * 2 + 32 * 8
    assert [s["n_push"] for s in figures["speedup"]] == list(pipeline.PUSHES)
    for s in figures["speedup"]:
        assert s["best_depth"] in pipeline.DEPTHS and positive(s["ratio"])
    assert [t["schedule"] for t in figures["torch"]] == list(SCHEDULES)
    for t in figures["torch"]:
        assert t["ok"], t["error"]
        assert positive(t["examples_per_s"]) and positive(t["ratio"])
    # The profiled runs: a worker for 1 stage, two for 2 (data shard with the first stage).
    profile = list(figures["profile"].values())
    assert [sorted(p) for p in profile] == [["worker1"], ["worker1", "worker2"]]
    assert profile[1]["worker1"]["hosts"] == ["data0", "replica0.stage0"]
    assert all(w["compute"] > 0 for p in profile for w in p.values())
    rows = bench.rows(report)
    assert len(rows) == len(runs) + len(pipeline.PUSHES) + len(SCHEDULES) + 3
    assert all(row[0] == "pipeline" for row in rows)
    json.dumps(report)


def test_a_torch_pipeline_that_does_not_finish_is_reported_failed_not_waited_for():
    from distbelief.models import mlp

    widths = (40, 8, 8, 10)
    x, y = torch.randn(256, 40), torch.randint(0, 10, (256,))
    out = torch_pipeline_examples_per_s(
        mlp(widths), 2, (x, y), schedule="gpipe", lr=0.1, steps=10**6, timeout_s=0.5
    )
    assert out == {"ok": False, "error": "timed out after 0.5 s"}
    assert multiprocessing.active_children() == []  # both stages killed and reaped
