"""Side-by-side benchmarks: the engine against plain PyTorch baselines, measured in one run.

Every comparison alternates its two sides ``repeats`` times so both see the same machine state.
The overhead and XOR ratios are the median of the paired ratios (each engine run against the
baseline run just before it): this machine's speed drifts by up to +-20% over minutes, which
moves both runs of a pair alike but can put the best run of one side in a fast minute and the
other's in a slow one. Absolute figures are the best run of each side (other load only ever
slows a run down). Ratios are *engine / baseline* throughput: 1.0 is parity, higher is better.
All sides run with one torch intra-op thread (see ``TORCH_THREADS``).

One module per benchmark (its doc says what it compares): ``overhead``, ``scaling``,
``shard``, ``xor``, ``hogwild``, ``sandblaster``, ``checkpoint``, ``pipeline``,
``model_parallel`` (``--only model-parallel``);
:mod:`.registry` lists them (the only list), :mod:`.runner` runs them, :mod:`.render` draws
the table, and :mod:`.baselines` holds what they are measured against (plain PyTorch loops,
Hogwild, torch's own pipelining), so that ``distbelief bench`` needs nothing outside the
installed package.
"""

from __future__ import annotations

from .common import FULL, MLP, QUICK, TORCH_THREADS, Benchmark, Sizes, mnist1d_train
from .hogwild import HOGWILD_MODES
from .registry import BENCHMARKS, REGISTRY, only_help, parse_only
from .render import COLUMNS, markdown, rows, table
from .runner import machine, run
from .shard import shard_pushes_per_s

__all__ = [
    "BENCHMARKS",
    "COLUMNS",
    "FULL",
    "HOGWILD_MODES",
    "MLP",
    "QUICK",
    "REGISTRY",
    "TORCH_THREADS",
    "Benchmark",
    "Sizes",
    "machine",
    "markdown",
    "mnist1d_train",
    "only_help",
    "parse_only",
    "rows",
    "run",
    "shard_pushes_per_s",
    "table",
]
