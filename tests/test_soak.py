"""Soak: 64 replicas x 2 stages x 4 shards in one process for ``EPOCHS`` epochs (12,288 steps),
a fault every ``FAULT_EVERY`` steps of each replica; and on ``processes`` 8 x 2 x 4 for 128
epochs (4,096 steps: what two cores carry in a test), a fault every 512 steps (64 of each
replica), its memory the driver's and its workers' together. Nothing may deadlock,
every fault must be survived, memory must not grow with the steps taken, and every actor must be
gone at the end.

The run is sized in epochs and its faults are keyed on counts (a replica's steps, a shard's
updates), as every fault plan is: the same run on any machine, however loaded. Set
``DISTBELIEF_SOAK_EPOCHS`` for a longer soak.

To add a kind of fault, add a maker to ``FAULT_KINDS`` with the most faults of its kind: the
faults of the plan, due ``FAULT_EVERY`` replica steps apart, are made by the kinds in turn; the
i-th of a kind is made by ``make(i, at_step)`` and names an actor no earlier fault named (a plan
kills each actor at most once).

No fast test here: the soak is one long run by design (marked ``soak`` and ``slow``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from support import mlp

import distbelief
from distbelief.algorithms.downpour import driver as downpour
from distbelief.core.partition import layer_sizes, resolve_split_points, split_layers
from distbelief.runtime.local import LocalRuntime
from distbelief.runtime.processes import ProcessesRuntime

SIZES = {"local": (64, 48, 12), "processes": (8, 128, 64)}
"""Per runtime: replicas, epochs and ``FAULT_EVERY``."""
RUNTIME = os.environ.get("DISTBELIEF_SOAK_RUNTIME", "local")
"""The runtime soaked (the soak's own process is told by the test)."""
REPLICAS, STAGES, SHARDS = SIZES[RUNTIME][0], 2, 4
EPOCHS = int(os.environ.get("DISTBELIEF_SOAK_EPOCHS", SIZES[RUNTIME][1]))
"""Epochs of the soak: 4 steps each per replica."""
ROWS_PER_REPLICA = 64  # 4 steps of 16 per epoch: many epochs, each replica reshuffles often
BATCH = 16
STEPS = EPOCHS * ROWS_PER_REPLICA // BATCH
"""Steps of each replica."""
FAULT_EVERY = SIZES[RUNTIME][2]
"""Replica steps between faults (the first at this step, none in the last ``FAULT_EVERY``)."""
WARM_UP = 0.25 if RUNTIME == "local" else 0.5
"""Fraction of the run, at its start, whose memory growth is not judged (allocator and caches
filling, the first restarts). On processes half: each process pays once for the first
restart of each kind it sees, the first shard whose state is lost most (the driver's process
serves it from then on, and every process allocates for that path: about 1 MiB in all), and
its 8 replicas take 8 times fewer steps between two faults than the 64 in one process."""
GROWTH_PER_STEP = 256
"""Most bytes the peak RSS may grow per step (of any replica) after the warm-up: a leak of one
16 x 16 activation (1 KiB) a step is 4 times that."""

FaultMaker = Callable[[int, int], str]


def model() -> torch.nn.Sequential:
    return mlp([10, 16, 16, 3])


def shard_updates_per_step() -> list[int]:
    """Updates each shard applies per step of every replica: one per stage it holds part of
    (n_push = 1), as the run lays the stages out over the shards."""
    layers = list(model().children())
    stages = split_layers(layers, resolve_split_points(layer_sizes(layers), STAGES))
    layout = downpour.build_layout(stages, SHARDS)
    held = [{seg.shard for seg in layout.segments_of_stage(s)} for s in range(STAGES)]
    return [REPLICAS * sum(k in h for h in held) for k in range(SHARDS)]


def stage_kill(i: int, at_step: int) -> str:
    """Kill a stage mid-step; the runtime rebuilds it and its replica redoes the step."""
    replica = (7 * i + 3) % REPLICAS  # distinct replicas for the first 64 faults
    return f"kill:replica{replica}.stage{i % STAGES}@step={at_step}"


def shard_kill(i: int, at_step: int) -> str:
    """Kill a parameter shard about when the replicas reach ``at_step``; the master restores
    it from the newest of the replicas' copies (there is no checkpoint here) while the
    replicas keep going."""
    return f"kill:shard{i}@update={at_step * shard_updates_per_step()[i]}"


def data_shard_kill(i: int, at_step: int) -> str:
    """Kill a data shard; it resumes its replica from the steps it last reported (numbered
    on from a new base: so no stage kill names a later step of its replica)."""
    replica = (7 * i + 3 + REPLICAS // 2) % REPLICAS  # none of the stage kills' replicas
    return f"kill:data{replica}@step={at_step}"


FAULT_KINDS: dict[str, tuple[FaultMaker, int]] = {
    # kind: (maker, most faults of the kind: a plan kills each actor at most once)
    "stage kill": (stage_kill, REPLICAS * STAGES),
    "shard kill": (shard_kill, SHARDS),
    "data shard kill": (data_shard_kill, REPLICAS),
}


def plan_faults() -> list[tuple[str, str]]:
    """``(kind, plan entry)`` for a fault every ``FAULT_EVERY`` replica steps, the kinds in turn
    (a kind whose actors are all taken is passed over)."""
    made: Counter[str] = Counter()
    out = []
    turns = itertools.cycle(FAULT_KINDS)
    for at_step in range(FAULT_EVERY, STEPS - FAULT_EVERY + 1, FAULT_EVERY):
        kind = next(k for k in turns if made[k] < FAULT_KINDS[k][1])
        out.append((kind, FAULT_KINDS[kind][0](made[kind], at_step)))
        made[kind] += 1
    actors = [spec.split(":")[1].split("@")[0].split(".")[0] for _, spec in out]
    data = {a.removeprefix("data") for a in actors if a.startswith("data")}
    stages = {a.removeprefix("replica") for a in actors if a.startswith("replica")}
    assert not data & stages, f"replicas with a data shard kill and a stage kill: {data & stages}"
    return out


def rss_bytes(pids: tuple = ("self",)) -> int:
    """The resident set size of these processes now, summed (gone ones count nothing)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def data():
    g = torch.Generator().manual_seed(0)
    n = REPLICAS * ROWS_PER_REPLICA
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def growth_per_step(samples: list[tuple[int, int]]) -> float:
    """Bytes of peak RSS gained per step after the warm-up: the peak of the last quarter of
    the samples (``(steps of all replicas, RSS)``) over the peak of the first quarter after
    the warm-up, divided by the steps between them."""
    late = [s for s in samples if s[0] > WARM_UP * samples[-1][0]]
    n = len(late) // 4
    first, last = late[:n], late[-n:]
    steps = last[-1][0] - first[-1][0]
    return (max(r for _, r in last) - max(r for _, r in first)) / steps


def soak() -> dict:
    """The soak run itself, in the process that calls it: what the test judges, as JSON."""
    faults = plan_faults()
    # The runtime the run would create (its seed, its faults), created here to be watched.
    make = LocalRuntime if RUNTIME == "local" else ProcessesRuntime
    runtime = make(0, faults=[spec for _, spec in faults], max_restarts=1)
    samples: list[tuple[int, int]] = []  # (steps of all replicas, RSS)
    queued: list[int] = []

    def progress(report) -> None:
        if RUNTIME == "local":
            samples.append((report.examples // BATCH, rss_bytes()))
            queued.append(runtime.queued())
        else:  # the driver's and its workers' (replacements' too) memory
            pids = ("self", *runtime.describe()["worker_pids"])
            samples.append((report.examples // BATCH, rss_bytes(pids)))

    result = distbelief.train(
        model(), data(), loss="cross_entropy", lr=0.05, optimizer="adagrad", batch_size=BATCH,
        epochs=EPOCHS, replicas=REPLICAS, stages=STAGES, shards=SHARDS, seed=0,
        progress=progress, runtime=runtime,
    )  # fmt: skip
    stats = result.stats
    return {
        "faults": faults,
        "stats": {
            k: stats[k]
            for k in ("examples", "steps", "train_s", "restarts_by_actor", "restarts", "recoveries")
        },  # fmt: skip
        "final_loss": result.history.train[-1]["loss"],
        "samples": samples,
        "queued": queued,
        "delivered": getattr(runtime, "delivered", 1),
        "hosted": runtime.hosted(),
    }


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_soak_64x2x4_in_process_with_a_fault_every_few_steps(capsys):
    soak_and_judge("local", capsys)


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.timeout(600)
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_soak_8x2x4_on_processes_with_a_fault_every_few_hundred_steps(capsys, monkeypatch):
    module = sys.modules[__name__]
    replicas, epochs, every = SIZES["processes"]
    epochs = int(os.environ.get("DISTBELIEF_SOAK_EPOCHS", epochs))
    steps = epochs * ROWS_PER_REPLICA // BATCH
    sizes = {"REPLICAS": replicas, "EPOCHS": epochs, "FAULT_EVERY": every, "STEPS": steps}
    for name, value in {**sizes, "WARM_UP": 0.5}.items():
        monkeypatch.setattr(module, name, value)
    monkeypatch.setitem(FAULT_KINDS, "stage kill", (stage_kill, replicas * STAGES))
    monkeypatch.setitem(FAULT_KINDS, "data shard kill", (data_shard_kill, replicas))
    soak_and_judge("processes", capsys)


def soak_and_judge(runtime: str, capsys) -> None:
    """Run the soak on ``runtime`` in a process of its own and judge it."""
    faults = plan_faults()
    assert {kind for kind, _ in faults} == set(FAULT_KINDS)
    # In a process of its own: the memory judged is the run's, not what the tests before it
    # left in this one's heap (in a whole-suite run this process holds ~800 MiB by then).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=540,
        env={**env, "DISTBELIEF_SOAK_RUNTIME": runtime},
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    run = json.loads(child.stdout.strip().splitlines()[-1])
    assert [tuple(f) for f in run["faults"]] == faults
    stats, samples, queued = run["stats"], [tuple(s) for s in run["samples"]], run["queued"]

    # No deadlock: the run completed, every example of every epoch trained.
    assert stats["examples"] == REPLICAS * ROWS_PER_REPLICA * EPOCHS
    assert stats["steps"] == REPLICAS * STEPS  # a step redone is counted once
    assert math.isfinite(run["final_loss"])
    # Every fault fired once and was survived.
    killed = {spec.split(":")[1].split("@")[0] for _, spec in faults}
    by_kind = Counter(kind for kind, _ in faults)
    assert stats["restarts_by_actor"] == dict.fromkeys(killed, 1)
    assert stats["restarts"] == len(faults)
    # Each dead shard restored from a replica's copy, which is newer than the shard's last
    # report to the master (the replicas fetch every step): nothing is counted lost.
    shard_recoveries = [r for r in stats["recoveries"] if r["actor"].startswith("shard")]
    assert len(shard_recoveries) == by_kind["shard kill"]
    for r in shard_recoveries:
        assert r["source"].startswith("replica") and "initial" not in r["source"], r
        assert 0 < r["applied_last_reported"] <= r["restored_version"], r
        assert r["lost_updates"] == 0, r
    # Memory: after the warm-up, the peak RSS does not grow with the steps taken.
    assert len(samples) >= 20
    growth = growth_per_step(samples)
    assert growth <= GROWTH_PER_STEP, (growth, samples)
    if queued:  # (in one process: the mailboxes are this process's to count)
        assert max(queued) <= 8 * REPLICAS  # a step in flight per replica: its messages only
    # Every actor stopped at the end (the runtime's view).
    assert run["delivered"] > 0 and run["hosted"] == []

    with capsys.disabled():
        print(
            f"\nsoak on {runtime}: {stats['train_s']:.0f} s of training, {EPOCHS} epochs, "
            f"{stats['steps']} steps; faults injected/survived: "
            + ", ".join(f"{k} {n}/{n}" for k, n in by_kind.items())
            + f"; peak RSS {samples[0][1] / 2**20:.1f} MiB at the first report, "
            f"{max(r for _, r in samples) / 2**20:.1f} MiB at most, growth after the warm-up "
            f"{growth:.0f} B per step; messages queued at most {max(queued, default='-')} "
            f"({len(samples)} samples)"
        )


if __name__ == "__main__":  # the soak's own process (see the test)
    print(json.dumps(soak()))
