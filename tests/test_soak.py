"""Soak: 64 replicas x 2 stages x 4 shards in one process for about a minute, a fault every few
seconds. Nothing may deadlock, every fault must be survived, memory must not creep, and every
actor must be gone at the end.

The run is sized, not stopped: a short calibration run of the same configuration measures this
machine's steps per second, the soak gets the epochs that take ``SECONDS`` at that rate, and the
faults are keyed on the step each replica reaches ``FAULT_EVERY_S`` seconds apart (keyed on
counts, as every fault plan is). Set ``DISTBELIEF_SOAK_S`` for a longer soak.

To add a kind of fault, add a maker to ``FAULT_KINDS`` with the most faults of its kind: the
faults of the plan, due ``FAULT_EVERY_S`` seconds apart, are made by the kinds in turn; the
i-th of a kind is made by ``make(i, at_s, rates)`` and names an actor no earlier fault named
(a plan kills each actor at most once).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from conftest import mlp

import distbelief
from distbelief import downpour
from distbelief.runtime.local import LocalRuntime

SECONDS = float(os.environ.get("DISTBELIEF_SOAK_S", "60"))
"""Training time the soak is sized for."""
REPLICAS, STAGES, SHARDS = 64, 2, 4
ROWS_PER_REPLICA = 64  # 4 steps of 16 per epoch: many epochs, each replica reshuffles often
BATCH = 16
FIRST_FAULT_S = 3.0
FAULT_EVERY_S = 4.0
MEMORY_SLACK = 0.10
"""Peak RSS of the second half may exceed the first half's by at most this fraction."""

Rates = dict[str, float]
FaultMaker = Callable[[int, float, Rates], str]


def stage_kill(i: int, at_s: float, rates: Rates) -> str:
    """Kill a stage mid-step; the runtime rebuilds it and its replica redoes the step."""
    replica = (7 * i + 3) % REPLICAS  # distinct replicas for the first 64 faults
    step = max(1, int(at_s * rates["replica_steps_per_s"]))
    return f"kill:replica{replica}.stage{i % STAGES}@step={step}"


def shard_kill(i: int, at_s: float, rates: Rates) -> str:
    """Kill a parameter shard; the master restores it from the newest of the replicas'
    copies (there is no checkpoint here) while the replicas keep going."""
    return f"kill:shard{i}@update={max(1, int(at_s * rates['shard_updates_per_s']))}"


def data_shard_kill(i: int, at_s: float, rates: Rates) -> str:
    """Kill a data shard; it resumes its replica from the steps it last reported."""
    replica = (11 * i + 5) % REPLICAS
    return f"kill:data{replica}@message={max(3, int(at_s * rates['replica_steps_per_s']))}"


FAULT_KINDS: dict[str, tuple[FaultMaker, int]] = {
    # kind: (maker, most faults of the kind: a plan kills each actor at most once)
    "stage kill": (stage_kill, REPLICAS * STAGES),
    "shard kill": (shard_kill, SHARDS),
    "data shard kill": (data_shard_kill, REPLICAS),
}


def plan_faults(rates: Rates, seconds: float) -> list[tuple[str, str]]:
    """``(kind, plan entry)`` for a fault every ``FAULT_EVERY_S`` seconds of ``seconds``, the
    kinds in turn (a kind whose actors are all taken is passed over)."""
    made: Counter[str] = Counter()
    out = []
    count = int((seconds - FIRST_FAULT_S - 2.0) // FAULT_EVERY_S) + 1  # none in the last 2 s
    turns = itertools.cycle(FAULT_KINDS)
    for i in range(max(count, 1)):
        kind = next(k for k in turns if made[k] < FAULT_KINDS[k][1])
        make = FAULT_KINDS[kind][0]
        out.append((kind, make(made[kind], FIRST_FAULT_S + i * FAULT_EVERY_S, rates)))
        made[kind] += 1
    return out


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def data():
    g = torch.Generator().manual_seed(0)
    n = REPLICAS * ROWS_PER_REPLICA
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(epochs: int, **kw):
    return distbelief.train(
        mlp([10, 16, 16, 3]),
        data(),
        loss="cross_entropy",
        lr=0.05,
        optimizer="adagrad",
        batch_size=BATCH,
        epochs=epochs,
        replicas=REPLICAS,
        stages=STAGES,
        shards=SHARDS,
        seed=0,
        **kw,
    )


@pytest.mark.soak
@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_soak_64x2x4_in_process_with_a_fault_every_few_seconds(monkeypatch, capsys):
    # Calibration: this machine's rate for this configuration, now.
    # Its rate between the first and the last progress report (past the start-up).
    seen: list[tuple[float, int]] = []
    calibration = train(epochs=8, progress=lambda r: seen.append((time.perf_counter(), r.examples)))
    (t_a, examples_a), (t_b, examples_b) = seen[len(seen) // 10], seen[-1]
    replica_steps_per_s = (examples_b - examples_a) / BATCH / (t_b - t_a) / REPLICAS
    # Every replica step pushes to every shard at least once (each holds part of some stage).
    shard_updates_per_s = (
        replica_steps_per_s
        * min(calibration.stats["updates_applied"])
        / (calibration.stats["steps"] / REPLICAS)
    )
    rates = {"replica_steps_per_s": replica_steps_per_s, "shard_updates_per_s": shard_updates_per_s}
    steps_per_epoch = ROWS_PER_REPLICA // BATCH
    epochs = math.ceil(SECONDS * replica_steps_per_s / steps_per_epoch)
    faults = plan_faults(rates, SECONDS)
    assert {kind for kind, _ in faults} == set(FAULT_KINDS)
    for _, spec in faults:  # each one fires: its count is reached before the run ends
        count = int(spec.rpartition("=")[2])
        assert count < epochs * steps_per_epoch * (REPLICAS if "@update=" in spec else 1), spec

    runtimes: list[LocalRuntime] = []
    real_make_runtime = downpour.make_runtime

    def make_runtime(*args, **kw):
        runtimes.append(real_make_runtime(*args, **kw))
        return runtimes[-1]

    monkeypatch.setattr(downpour, "make_runtime", make_runtime)
    samples: list[tuple[float, int, int]] = []  # (seconds, RSS, messages queued)
    t0 = time.perf_counter()

    def progress(report) -> None:
        samples.append((time.perf_counter() - t0, rss_bytes(), runtimes[0].queued()))

    result = train(
        epochs,
        progress=progress,
        runtime_options={"faults": [spec for _, spec in faults], "max_restarts": 1},
    )

    # No deadlock: the run completed, every example of every epoch trained.
    assert result.stats["examples"] == REPLICAS * ROWS_PER_REPLICA * epochs
    assert math.isfinite(result.history.train[-1]["loss"])
    # Every fault fired once and was survived.
    killed = {spec.split(":")[1].split("@")[0] for _, spec in faults}
    by_kind = Counter(kind for kind, _ in faults)
    assert result.stats["restarts_by_actor"] == dict.fromkeys(killed, 1)
    assert result.stats["restarts"] == len(faults)
    # Each dead shard restored from the replicas' copies, at a version no older than its last
    # report (lost_updates counts from there).
    shard_recoveries = [r for r in result.stats["recoveries"] if r["actor"].startswith("shard")]
    assert len(shard_recoveries) == by_kind["shard kill"]
    assert all(r["lost_updates"] >= 0 and "replica" in r["source"] for r in shard_recoveries)
    # Memory: the second half's peak within MEMORY_SLACK of the first half's.
    assert len(samples) >= 20
    middle = (samples[0][0] + samples[-1][0]) / 2
    first = max(rss for t, rss, _ in samples if t <= middle)
    second = max(rss for t, rss, _ in samples if t > middle)
    assert second <= first * (1 + MEMORY_SLACK), (first, second)
    queued = [q for _, _, q in samples]
    assert max(queued) <= 8 * REPLICAS  # a step in flight per replica: its messages, no more
    # Every actor stopped at the end (the runtime's view).
    assert len(runtimes) == 1 and runtimes[0].hosted() == []

    with capsys.disabled():
        print(
            f"\nsoak: {result.stats['train_s']:.0f} s of training, {epochs} epochs, "
            f"{result.stats['steps']} steps ({replica_steps_per_s:.1f} steps/s per replica); "
            f"faults injected/survived: "
            + ", ".join(f"{k} {n}/{n}" for k, n in by_kind.items())
            + f"; peak RSS first half {first / 2**20:.1f} MiB, second half "
            f"{second / 2**20:.1f} MiB ({(second / first - 1) * 100:+.1f}%); "
            f"messages queued at most {max(queued)} ({len(samples)} samples); updates lost "
            f"per shard kill {[r['lost_updates'] for r in shard_recoveries]}"
        )
