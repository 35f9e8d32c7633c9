"""The benchmarks, in the order they run and are shown: the only list of them. Adding a
benchmark is its module (measurement, rows, ``BENCHMARK``) and one entry here; ``--only``, its
help and the results table follow."""

from __future__ import annotations

from . import (
    checkpoint,
    hogwild,
    model_parallel,
    overhead,
    pipeline,
    sandblaster,
    scaling,
    shard,
    xor,
)
from .common import Benchmark

REGISTRY: tuple[Benchmark, ...] = tuple(
    module.BENCHMARK
    for module in (
        overhead,
        scaling,
        shard,
        xor,
        hogwild,
        sandblaster,
        checkpoint,
        pipeline,
        model_parallel,
    )
)
BENCHMARKS: tuple[str, ...] = tuple(b.name for b in REGISTRY)
"""Every benchmark's name, in order (what ``--only`` accepts)."""
assert len(set(BENCHMARKS)) == len(BENCHMARKS), f"a benchmark name twice: {BENCHMARKS}"


def get(name: str) -> Benchmark:
    """The benchmark called ``name``; KeyError if there is none."""
    for benchmark in REGISTRY:
        if benchmark.name == name:
            return benchmark
    raise KeyError(name)


def parse_only(text: str | None) -> tuple[str, ...]:
    """``"overhead,shard"`` -> the benchmarks to run (all if None); ValueError names bad ones."""
    if text is None:
        return BENCHMARKS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in BENCHMARKS]
    if bad or not names:
        raise ValueError(
            f"only: unknown benchmark {', '.join(bad) or repr(text)}; choose from "
            f"{', '.join(BENCHMARKS)}"
        )
    return names


def only_help() -> str:
    """The help text of ``distbelief bench --only``, naming every benchmark."""
    return f"Comma-separated subset: {', '.join(BENCHMARKS)}."
