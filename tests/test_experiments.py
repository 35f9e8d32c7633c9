"""``distbelief experiment``: each experiment's quick run writes every promised file (run
directories, figures, ``results.json``, one HTML page embedding the figures) and its verdicts
are its rule applied to the measured numbers; each rule flips on synthetic numbers either side
of its threshold; the same seed gives the same numbers and verdicts; bad input exits 2 naming
it before any run starts."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from distbelief import experiments
from distbelief.cli import main
from distbelief.errors import ConfigError
from distbelief.experiments import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    adagrad_replicas,
    fetch_push,
    stragglers,
    warmstart,
)
from distbelief.experiments.base import validation_split
from distbelief.report import load_run

NAMES = [e.name for e in experiments.REGISTRY]


# ---------------------------------------------------------------- quick runs


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_every_file_and_applies_its_rule(name: str, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    results = experiments.run(name, quick=True, out=out)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["experiment"] == name and on_disk["quick"] is True
    # every run has its run directory, loadable by distbelief report
    assert on_disk["runs"]
    for run in on_disk["runs"]:
        assert (out / "runs" / run["name"] / "config.toml").is_file()
        assert load_run(out / "runs" / run["name"]).end is not None
    # every figure is a PNG, embedded in the page
    page = (out / "experiment.html").read_text()
    assert on_disk["figures"]
    for figure in on_disk["figures"]:
        png = (out / figure).read_bytes()
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode("ascii") in page
    # the verdicts are the rule applied to the measured numbers, and the page shows them
    rule = experiments.get(name).judge
    assert rule is not None
    again = [v.__dict__ for v in rule(on_disk["measured"])]
    assert json.loads(json.dumps(again)) == on_disk["verdicts"]
    assert on_disk["verdicts"] == results["verdicts"]
    for verdict in on_disk["verdicts"]:
        assert verdict["verdict"] in (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)
        assert f"<b>{verdict['verdict']}</b>" in page
    assert experiments.get(name).statement[:40] in page.replace("&quot;", '"')


@pytest.mark.slow
def test_same_seed_same_numbers_and_verdicts(tmp_path: Path) -> None:
    # The cheapest experiment on the in-process runtime (bit for bit from the seed), made
    # smaller still.
    sizes = {"fit_examples": 600, "replicas": (1, 4)}
    first = experiments.run("adagrad-replicas", quick=True, out=tmp_path / "a", seed=3,
                            sizes=sizes)  # fmt: skip
    second = experiments.run("adagrad-replicas", quick=True, out=tmp_path / "b", seed=3,
                             sizes=sizes)  # fmt: skip
    assert first["seeds"] == [3]
    assert first["measured"] == second["measured"]
    assert first["verdicts"] == second["verdicts"]


def test_validation_split_is_disjoint_seeded_and_leaves_the_test_set_alone() -> None:
    import torch

    x, y = torch.arange(100.0).unsqueeze(1), torch.arange(100)
    (fx, fy), (vx, vy) = validation_split((x, y), 0.1, seed=1)
    assert len(vx) == 10 and len(fx) == 90
    assert set(fy.tolist()).isdisjoint(vy.tolist())
    assert set(fy.tolist()) | set(vy.tolist()) == set(range(100))
    assert torch.equal(validation_split((x, y), 0.1, seed=1)[1][1], vy)


# ---------------------------------------------------------------- the rules


def _adagrad(acc: dict[str, dict[int, float]]) -> dict[str, Any]:
    points = {f"{opt}/{r}": {"test_accuracy": a} for opt, by in acc.items() for r, a in by.items()}
    return {"replicas": sorted(acc["sgd"]), "points": points, "tolerance": 0.03}


def test_adagrad_replicas_rule_flips() -> None:
    judge = adagrad_replicas.judge
    good = {1: 0.70, 4: 0.69, 16: 0.68}
    sgd_short = {1: 0.70, 4: 0.69, 16: 0.60}
    assert judge(_adagrad({"sgd": sgd_short, "adagrad": good}))[0].verdict == HOLDS
    assert judge(_adagrad({"sgd": good, "adagrad": sgd_short}))[0].verdict == DOES_NOT_HOLD
    assert judge(_adagrad({"sgd": good, "adagrad": good}))[0].verdict == INCONCLUSIVE
    # at the threshold: 0.03 below one replica's still counts, a little more does not
    edge = {1: 0.70, 4: 0.69, 16: 0.671}
    assert judge(_adagrad({"sgd": sgd_short, "adagrad": edge}))[0].verdict == HOLDS
    past = {1: 0.70, 4: 0.69, 16: 0.669}
    verdict = judge(_adagrad({"sgd": sgd_short, "adagrad": past}))[0]
    assert verdict.verdict == DOES_NOT_HOLD
    assert verdict.numbers["max_productive_adagrad"] == verdict.numbers["max_productive_sgd"] == 4


def _warm(diverged: dict[int, int], runs: int = 8) -> dict[str, Any]:
    points = [
        {"warmstart_steps": w, "diverged": d, "runs": runs, "diverged_share": d / runs,
         "early_loss_spread": None}
        for w, d in diverged.items()
    ]  # fmt: skip
    return {"points": points, "replicas": 32, "optimizer": "sgd", "lr": 0.3, "search_seed": 9}


def test_warmstart_rule_flips() -> None:
    judge = warmstart.judge
    assert judge(_warm({0: 4, 25: 2, 400: 1}))[0].verdict == HOLDS  # 1/8 <= 4/8 / 4
    assert judge(_warm({0: 4, 25: 2, 400: 2}))[0].verdict == DOES_NOT_HOLD  # 2/8 >= 4/8 / 2
    assert judge(_warm({0: 8, 400: 3}))[0].verdict == INCONCLUSIVE  # between the two
    assert judge(_warm({0: 1, 400: 0}))[0].verdict == INCONCLUSIVE  # too few diverged
    assert judge(_warm({0: 2, 400: 0}))[0].verdict == HOLDS


def _fp(rates: dict[int, float], reach: dict[int, float | None]) -> dict[str, Any]:
    points = [
        {"n": n, "examples_per_s": r, "time_to_target": reach[n], "test_accuracy": 0.5}
        for n, r in rates.items()
    ]
    return {"points": points, "target": 0.4, "virtual": True, "replicas": 16}


def test_fetch_push_rules_flip() -> None:
    judge = fetch_push.judge
    reach = {1: 2.0, 2: 1.0, 4: 3.0}
    assert judge(_fp({1: 100.0, 2: 150.0, 4: 120.0}, reach))[0].verdict == HOLDS
    assert judge(_fp({1: 100.0, 2: 149.0, 4: 120.0}, reach))[0].verdict == INCONCLUSIVE
    assert judge(_fp({1: 100.0, 2: 109.0, 4: 105.0}, reach))[0].verdict == DOES_NOT_HOLD
    rates = {1: 100.0, 2: 200.0, 4: 300.0}
    assert judge(_fp(rates, reach))[1].verdict == HOLDS
    assert judge(_fp(rates, {1: 1.0, 2: 1.5, 4: None}))[1].verdict == DOES_NOT_HOLD
    assert judge(_fp(rates, {1: None, 2: 1.5, 4: 1.0}))[1].verdict == INCONCLUSIVE


def _strag(on: float, off: float, slow_acc: float, killed: float | None) -> dict[str, Any]:
    sb = []
    for per, backups, ratio in ((16, True, on), (1, False, off)):
        sb += [
            {"portions_per_replica": per, "backup_tasks": backups, "slowdown": k,
             "s_per_eval": s}
            for k, s in ((1, 1.0), (10, ratio))
        ]  # fmt: skip
    dp: dict[str, Any] = {
        "fault-free": [{"val_final": 0.70}],
        "slow replica": [{"val_at_fault_free_end": slow_acc}],
    }
    if killed is not None:
        dp["killed shard"] = [{"val_final": killed}]
    return {"sandblaster": sb, "downpour": dp, "slowdowns": [1, 10], "virtual": True,
            "runtime": "simulated", "downpour_slowdown": "10x"}  # fmt: skip


def test_stragglers_rules_flip() -> None:
    judge = stragglers.judge
    verdicts = [v.verdict for v in judge(_strag(1.5, 3.0, 0.67, 0.671))]
    assert verdicts == [HOLDS, HOLDS, HOLDS]
    verdicts = [v.verdict for v in judge(_strag(1.6, 3.2, 0.669, 0.6))]
    assert verdicts == [INCONCLUSIVE, DOES_NOT_HOLD, DOES_NOT_HOLD]
    assert judge(_strag(1.2, 2.3, 0.7, 0.7))[0].verdict == INCONCLUSIVE  # gain below 2x
    assert judge(_strag(3.0, 3.0, 0.7, 0.7))[0].verdict == DOES_NOT_HOLD
    # a case not run, or no evaluation by then: inconclusive
    assert judge(_strag(1.0, 3.0, 0.7, None))[2].verdict == INCONCLUSIVE
    no_eval = _strag(1.0, 3.0, 0.7, 0.7)
    no_eval["downpour"]["slow replica"] = [{"val_at_fault_free_end": None}]
    assert judge(no_eval)[1].verdict == INCONCLUSIVE


# ---------------------------------------------------------------- the command


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["experiment", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_names_every_experiment_and_what_it_shows(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = _cli(capsys, "--list")
    assert code == 0
    for experiment in experiments.REGISTRY:
        assert experiment.name in out and experiment.title[:40] in out


def test_unknown_name_lists_the_known_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = _cli(capsys, "adagrad", "--out", str(tmp_path / "x"))
    assert code == 2
    assert "'adagrad'" in err
    for name in experiments.names():
        assert name in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_into_a_file_exits_2_naming_it_before_any_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, where: str
) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    out = blocker if where == "file" else blocker / "sub"
    code, _, err = _cli(capsys, "warmstart", "--quick", "--out", str(out))
    assert code == 2
    assert err.startswith("distbelief: error: out:") and str(out) in err
    assert blocker.read_text() == "not a directory"


def test_out_holding_an_experiment_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "results.json").write_text("{}")
    code, _, err = _cli(capsys, "warmstart", "--quick", "--out", str(tmp_path))
    assert code == 2 and "already holds an experiment" in err


def test_runtime_not_accepted_names_the_accepted_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = _cli(capsys, "stragglers", "--runtime", "local", "--out", str(tmp_path / "o"))
    assert code == 2
    assert "runtime:" in err and "simulated, processes" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["warmstart", "--seeds", "0"], "seeds:"),
        ([], "experiment: name one of"),
    ],
)
def test_other_bad_input_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], named: str
) -> None:
    code, _, err = _cli(capsys, *args, *(["--out", str(tmp_path / "o")] if args else []))
    assert code == 2 and named in err
    assert not (tmp_path / "o").exists()


def test_unknown_size_is_refused_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sizes: unknown"):
        experiments.run("warmstart", quick=True, out=tmp_path / "o", sizes={"replica": 2})
    assert not (tmp_path / "o").exists()
