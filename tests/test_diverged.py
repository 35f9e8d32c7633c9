"""A run that diverges ends with TrainingDiverged, never as a result that looks fine."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from support import mlp

import distbelief
from distbelief.cli import main
from distbelief.core.flat import flatten


def toy(n: int = 256):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def run(**kw):
    args = dict(loss="cross_entropy", lr=0.1, batch_size=8, epochs=2, replicas=2, seed=0)
    args.update(kw)
    model = args.pop("model", None) or mlp([10, 16, 3])
    return distbelief.train(model, toy(), eval_data=toy(64), **args)


def nan_loss_from_call(first: int, last: int | None = None):
    """Cross-entropy, but NaN on calls ``first``..``last`` (all later ones if None)."""
    calls = {"n": 0}

    def loss(out, target):
        calls["n"] += 1
        bad = calls["n"] >= first and (last is None or calls["n"] <= last)
        return F.cross_entropy(out, target) * (float("nan") if bad else 1.0)

    return loss


def test_a_loss_that_turns_nan_stops_the_run_keeping_the_last_good_parameters(runtime):
    with pytest.raises(distbelief.TrainingDiverged, match="steps had a NaN or Inf loss") as info:
        run(loss=nan_loss_from_call(20), stages=2, shards=2, runtime=runtime)
    # The shards rejected every NaN push, so what they hold is finite and is kept.
    assert info.value.model is not None
    assert torch.isfinite(flatten(info.value.model.children())).all()


def test_a_rate_that_blows_up_sgd_is_a_divergence():
    with pytest.raises(distbelief.TrainingDiverged, match="NaN or Inf"):
        run(lr=1e30, optimizer="sgd")


def test_float16_adagrad_that_turns_the_parameters_nan_keeps_none():
    model = mlp([10, 16, 3], dtype=torch.float16)
    x, y = toy()
    with pytest.raises(distbelief.TrainingDiverged) as info:
        distbelief.train(model, (x.half(), y), loss="cross_entropy", lr=0.05, batch_size=8,
                         epochs=2, replicas=2, optimizer="adagrad", seed=0)  # fmt: skip
    assert info.value.model is None and "none are kept" in str(info.value)


def test_one_bad_batch_is_a_counted_warning_not_a_failure(caplog):
    with caplog.at_level(logging.WARNING, logger="distbelief"):
        result = run(loss=nan_loss_from_call(30, 30), stages=2, shards=2)
    # 2 replicas x 2 epochs of 16 steps; a step pushes 3 times (stage 0's layers lie in
    # shard 0, stage 1's straddle both shards). The one poisoned step's 3 pushes are all
    # rejected, every other push is applied: nothing of the NaN reaches a shard.
    assert result.stats["nonfinite_steps"] == 1
    assert result.stats["steps"] == 64
    assert result.stats["rejected_pushes"] == 3
    assert result.stats["updates_applied_total"] == 64 * 3 - 3
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert any("were rejected" in r.getMessage() for r in caplog.records)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result.history.eval)


def test_the_command_exits_1_with_one_line_and_valid_json(capsys):
    code = main(["train", "digits", "--lr", "1e30", "--optimizer", "sgd", "--epochs", "2",
                 "--no-run-dir", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("distbelief: error: training diverged")
    failure = json.loads(out.strip().splitlines()[-1])  # strict: no bare NaN
    assert failure["exit_status"] == 1 and "diverged" in failure["error"]
