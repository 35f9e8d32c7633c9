"""Sandblaster never ends in NaN: TrainingDiverged as for Downpour (a non-finite loss, a line
search that meets only non-finite losses, non-finite final parameters), the CLI's exit 1
and strict JSON; and a fault plan it cannot survive is refused before the run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import distbelief
from distbelief import ConfigError, TrainingDiverged
from distbelief import cli as cli_module
from distbelief.algorithms.sandblaster.lbfgs import Settings, minimize
from distbelief.cli import main


def badly_scaled() -> tuple[nn.Sequential, tuple[torch.Tensor, torch.Tensor]]:
    """A regression with inputs around 1e6 and targets around 1e12, whose second L-BFGS step
    meets only NaN (on 329df65 it returned losses [6e23, nan, nan] and NaN parameters)."""
    g = torch.Generator().manual_seed(0)
    torch.randn(256, 4, generator=g), torch.randn(4, 1, generator=g)  # (the draws it was found at)
    x = torch.randn(256, 10, generator=g)
    y = x @ torch.randn(10, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))
    return model, (x * 1e6, y * 1e12)


def test_the_badly_scaled_regression_raises_training_diverged() -> None:
    model, data = badly_scaled()
    with pytest.raises(TrainingDiverged, match="line search met only NaN or Inf") as caught:
        distbelief.train(model, data, loss="mse", algorithm="sandblaster", steps=20, replicas=2,
                         seed=0)  # fmt: skip
    kept = caught.value.model  # the parameters before the step that failed: finite
    assert kept is not None and all(bool(torch.isfinite(p).all()) for p in kept.parameters())
    stats = caught.value.stats
    assert stats["stop"] == "diverged" and stats["steps"] == 1
    assert math.isfinite(stats["final_loss"])


def test_a_nan_loss_at_the_start_is_a_divergence_in_the_algorithm_itself() -> None:
    def closure(w: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
        return float("nan"), torch.zeros_like(w)

    _, out = minimize(closure, torch.zeros(3), Settings(steps=5))
    assert out.stop == "diverged" and "initial parameters is nan" in out.diverged

    def cliff(w: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
        # a bowl around 0.5 whose loss is Inf (and gradient NaN) beyond 1 from the start
        if float(w.abs().max()) > 1.0:
            return float("inf"), torch.full_like(w, float("nan"))
        return float((w - 0.5).pow(2).sum()), 2 * (w - 0.5)

    # the first step tried (lr 100) goes over the cliff: the line search comes back from it
    x, out = minimize(cliff, torch.zeros(3), Settings(steps=10, lr=100.0, max_evals=100))
    assert out.stop != "diverged" and out.loss < 1e-6
    assert torch.allclose(x, torch.full((3,), 0.5), atol=1e-3)


def test_the_command_exits_1_with_one_line_and_strict_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cli_module.train

    def on_bad_data(model, train_data, **kw):  # noqa: ANN001, ANN003, ANN202
        bad_model, bad_data = badly_scaled()
        kw.update(loss="mse", eval_data=None, steps=20, replicas=2, shards=1, portions=None,
                  batch_size=None, seed=0)  # as the API test: the same sums  # fmt: skip
        return real(bad_model, bad_data, **kw)

    monkeypatch.setattr(cli_module, "train", on_bad_data)
    code = main(["train", "digits", "--algorithm", "sandblaster", "--no-run-dir", "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "line search met only NaN" in err
    last = json.loads(out.strip().splitlines()[-1])  # strict JSON: json.loads takes NaN too
    assert last["exit_status"] == 1 and "training diverged" in last["error"]
    assert "NaN" not in out.replace("NaN or Inf", "")


@pytest.mark.parametrize("actor", ["shard0", "coordinator"])
def test_a_fault_plan_sandblaster_cannot_survive_is_refused_before_the_run(
    capsys: pytest.CaptureFixture[str], actor: str
) -> None:
    x = torch.randn(64, 10)
    with pytest.raises(ConfigError, match=f"faults: kill:{actor}.*cannot survive"):
        distbelief.train(nn.Sequential(nn.Linear(10, 2)), (x, (x[:, 0] > 0).long()),
                         loss="cross_entropy", algorithm="sandblaster", replicas=2,
                         runtime_options={"faults": [f"kill:{actor}@message=3"]})  # fmt: skip
    code = main(["train", "digits", "--algorithm", "sandblaster", "--no-run-dir",
                 "--inject", f"kill:{actor}@message=3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{actor}" in err and "cannot survive" in err
