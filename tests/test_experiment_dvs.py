"""``downpour-vs-sandblaster`` and the warmstart rule's guard: each rule flips on synthetic
numbers either side of its thresholds; the same seed gives the same numbers on the simulated
runtime; the quick run writes its figures and embeds them (the shared quick-run test in
test_experiments.py covers every promised file)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from distbelief import experiments
from distbelief.experiments import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, warmstart
from distbelief.experiments import downpour_vs_sandblaster as dvs

RS = (1, 4, 16, 64)


def _measured(times: dict[str, tuple[float | None, ...]], end: float = 10.0) -> dict[str, Any]:
    """Time to target per method by replica count (None: not reached by ``end``)."""
    points = [
        {"method": m, "replicas": r, "time_to_target": t, "end_s": end}
        for m, ts in times.items()
        for r, t in zip(RS, ts)
    ]
    return {"points": points, "replicas": list(RS), "target": 0.5}


SCALES = {  # Sandblaster 8x, Downpour 2x: Sandblaster scales best
    "downpour-sgd": (2.0, 1.5, 1.2, 1.0),
    "downpour-adagrad": (1.0, 0.8, 0.6, 0.5),
    "sandblaster": (8.0, 4.0, 2.0, 1.0),
}


def _verdicts(times: dict[str, tuple[float | None, ...]], end: float = 10.0) -> list[str]:
    return [v.verdict for v in dvs.judge(_measured(times, end))]


def test_tradeoff_rule_flips_on_the_modest_counts() -> None:
    # Adagrad soonest at 1, 4 and 16 (all modest counts): holds
    assert _verdicts(SCALES)[0] == HOLDS
    # soonest at 2 of 3: still more than half
    two = {**SCALES, "downpour-sgd": (2.0, 0.7, 1.2, 1.0)}
    assert _verdicts(two)[0] == HOLDS
    # at 1 of 3: inconclusive; at none: does not hold
    one = {**SCALES, "downpour-sgd": (0.9, 0.7, 1.2, 1.0)}
    assert _verdicts(one)[0] == INCONCLUSIVE
    none = {**SCALES, "downpour-sgd": (0.9, 0.7, 0.5, 1.0)}
    assert _verdicts(none)[0] == DOES_NOT_HOLD
    # a count past MODEST does not count: Adagrad last at 64 changes nothing
    late = {**SCALES, "downpour-adagrad": (1.0, 0.8, 0.6, 5.0)}
    assert dvs.MODEST < 64 and _verdicts(late)[0] == HOLDS
    # a tie is no one's win
    ties = {**SCALES, "downpour-sgd": (1.0, 0.8, 0.6, 1.0)}
    verdict = dvs.judge(_measured(ties))[0]
    assert verdict.verdict == DOES_NOT_HOLD and verdict.numbers["soonest"][1] == "tie"
    # no method reaches the target at any modest count: inconclusive
    never = {m: (None, None, None, 1.0) for m in SCALES}
    assert _verdicts(never)[0] == INCONCLUSIVE


def test_scaling_rule_flips_on_the_speedups() -> None:
    assert _verdicts(SCALES)[1] == HOLDS  # 8x against 2x and 2x, still falling
    # a Downpour variant scaling as well as Sandblaster: does not hold
    even = {**SCALES, "downpour-adagrad": (8.0, 4.0, 2.0, 1.0)}
    assert _verdicts(even)[1] == DOES_NOT_HOLD
    just_below = {**SCALES, "downpour-adagrad": (7.9, 4.0, 2.0, 1.0)}
    assert _verdicts(just_below)[1] == HOLDS
    # Sandblaster best but no longer improving at the last step: inconclusive
    flat = {**SCALES, "sandblaster": (8.0, 4.0, 1.0, 1.0)}
    assert _verdicts(flat)[1] == INCONCLUSIVE
    # Sandblaster not reaching the target at the most replicas: inconclusive
    short = {**SCALES, "sandblaster": (8.0, 4.0, 2.0, None)}
    assert _verdicts(short)[1] == INCONCLUSIVE
    # a Downpour variant not reaching it at the most replicas: its bound (time at 1 over the
    # run's end) counts; a bound at least Sandblaster's does not hold, a lower one holds
    cut = {**SCALES, "downpour-sgd": (2.0, 1.5, 1.2, None)}
    assert _verdicts(cut, end=0.2)[1] == DOES_NOT_HOLD  # bound 2 / 0.2 = 10x >= 8x
    verdict = dvs.judge(_measured(cut, end=1.0))[1]
    assert verdict.verdict == HOLDS and verdict.numbers["exact"]["downpour-sgd"] is False
    assert verdict.numbers["speedups"]["downpour-sgd"] == pytest.approx(2.0)


def test_curve_times_and_target_crossing() -> None:
    points = [{"t": 0.1, "accuracy": 0.3}, {"t": 0.2, "accuracy": 0.5}, {"t": 0.3, "accuracy": 0.6}]
    assert dvs.reached(points, 0.5) == 0.2
    assert dvs.reached(points, 0.7) is None
    where = dvs.cluster(3, 2, "downpour")
    assert where["machines"] == 6 and where["speeds"][0] == dvs.OBSERVER_SPEED
    assert where["placement"]["replica2"] == where["placement"]["data2"] == 5
    assert dvs.cluster(3, 2, "sandblaster")["speeds"] == [1.0] * 6


def test_warmstart_as_long_as_a_replica_run_is_inconclusive() -> None:
    points = [
        {"warmstart_steps": w, "diverged": d, "runs": 8, "diverged_share": d / 8,
         "early_loss_spread": None}
        for w, d in ((0, 8), (400, 0))
    ]  # fmt: skip
    measured = {"points": points, "replicas": 16, "optimizer": "sgd", "lr": 0.45,
                "search_seed": 1000}  # fmt: skip
    assert warmstart.judge({**measured, "replica_steps": 401})[0].verdict == HOLDS
    capped = warmstart.judge({**measured, "replica_steps": 400})[0]
    assert capped.verdict == INCONCLUSIVE and capped.numbers["capped"] is True


SMALL = {"replicas": (1, 2), "downpour_epochs": (1, 1), "sb_steps": 2, "curve_replicas": 2}


@pytest.mark.slow
def test_same_seed_same_numbers_on_simulated_and_figures_embedded(tmp_path: Path) -> None:
    first = experiments.run("downpour-vs-sandblaster", quick=True, out=tmp_path / "a", seed=2,
                            sizes=SMALL)  # fmt: skip
    second = experiments.run("downpour-vs-sandblaster", quick=True, out=tmp_path / "b", seed=2,
                             sizes=SMALL)  # fmt: skip
    assert first["runtime"] == "simulated" and first["reproducible"] is True
    assert first["measured"] == second["measured"]
    assert first["verdicts"] == second["verdicts"]
    # every method at every replica count, with a virtual-time curve from the warm start
    pts = first["measured"]["points"]
    assert {(p["method"], p["replicas"]) for p in pts} == {
        (m, r) for m in dvs.METHODS for r in (1, 2)
    }
    assert all(p["curve"] and p["curve"][-1]["t"] == p["end_s"] for p in pts)
    page = (tmp_path / "a" / "experiment.html").read_text()
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["figures"] == [
        "downpour_vs_sandblaster_time_to_target.png",
        "downpour_vs_sandblaster_accuracy.png",
    ]
    for name in on_disk["figures"]:
        assert base64.b64encode((tmp_path / "a" / name).read_bytes()).decode() in page


@pytest.mark.slow
def test_warmstart_counts_the_steps_a_replica_runs(tmp_path: Path) -> None:
    # A rate that never diverges, so every run reports its steps.
    results = experiments.run("warmstart", quick=True, out=tmp_path / "w",
                              sizes={"lr_grid": (0.05,)})  # fmt: skip
    measured = results["measured"]
    runs = [r for r in results["runs"] if r["name"].startswith("w") and not r["diverged"]]
    assert runs
    for run in runs:
        assert run["stats"]["steps"] == measured["replica_steps"] * measured["replicas"]
    most = max(p["warmstart_steps"] for p in measured["points"])
    assert most < measured["replica_steps"]
    assert results["verdicts"][0]["numbers"]["capped"] is False
