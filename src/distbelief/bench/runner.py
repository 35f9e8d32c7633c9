"""Running benchmarks: :func:`run` measures the named ones and returns the report, headed with
the command that reproduces it, the commit measured and the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .common import FULL, QUICK, TORCH_THREADS, Log
from .registry import BENCHMARKS, get

PACKAGE = Path(__file__).resolve().parents[1]
"""distbelief's own sources (``src/distbelief`` in a checkout): what ``+dirty`` is about."""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": TORCH_THREADS,
    }


def _commit() -> str | None:
    """The git commit of the source tree being measured, ``+dirty`` if the package's sources
    differ from it (the figures then belong to the working tree, not to the commit); None for
    an installed package outside any checkout."""

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=PACKAGE, check=False
        )
        return proc.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", str(PACKAGE))
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def run(
    names: Sequence[str] = BENCHMARKS,
    *,
    quick: bool = False,
    repeats: int | None = None,
    log: Log = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the named benchmarks and return every figure (JSON-serialisable)."""
    sizes = QUICK if quick else FULL
    repeats = repeats or sizes.repeats
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    command = "distbelief bench" + (" --quick" if quick else "")
    if tuple(names) != BENCHMARKS:
        command += " --only " + ",".join(names)
    if repeats != sizes.repeats:
        command += f" --repeats {repeats}"
    report: dict[str, Any] = {
        "command": command,
        "commit": _commit(),
        "machine": machine(),
        "quick": quick,
        "repeats": repeats,
        "sizes": asdict(sizes),
    }
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            for name in names:
                report[name] = get(name).measure(sizes, repeats, log, seed)
    finally:
        torch.set_num_threads(threads)
    report["bench_s"] = round(time.perf_counter() - t0, 1)
    return report
