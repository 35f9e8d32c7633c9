"""What a resumed run may change and what it must share with its checkpoint (README,
*Checkpoints and resume*): the API refuses another update rule, rate or training-set size;
the command refuses those flags and takes a changed ``--eval-every``, ``--inject`` and
``--checkpoint-every``, which then take effect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support import mlp

import distbelief
from distbelief import ConfigError
from distbelief.cli import main

KW = dict(loss="cross_entropy", lr=0.05, batch_size=16, optimizer="adagrad", seed=3)


def toy_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


@pytest.fixture(scope="module")
def api_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api") / "ck"
    distbelief.train(mlp([10, 8, 2]), toy_data(), epochs=1, checkpoint_dir=root, **KW)
    return root


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimizer": "sgd"}, "^optimizer: .* with optimizer 'adagrad', this run has 'sgd'"),
        ({"lr": 0.1}, "^lr: .* was taken with lr 0.05, this run has 0.1"),
        ({"data": 255}, "^train_data: .* was taken on 256 training examples, this run has 255"),
    ],
)  # fmt: skip
def test_the_api_refuses_another_update_rule_rate_or_training_set(api_checkpoint, change, message):
    kw = {**KW, **change}
    data = toy_data(kw.pop("data", 256))
    with pytest.raises(ConfigError, match=message):
        distbelief.train(mlp([10, 8, 2]), data, epochs=2, resume=api_checkpoint, **kw)


def test_the_api_resumes_with_the_same_settings(api_checkpoint, tmp_path):
    """The control for the refusals above: nothing changed but the epochs, it carries on."""
    root = tmp_path / "ck"
    shutil.copytree(api_checkpoint, root)
    result = distbelief.train(mlp([10, 8, 2]), toy_data(), epochs=2, resume=root, **KW)
    assert result.stats["resumed_from_update"] == 16 and result.stats["updates_applied"] == [32]


# ------------------------------------------------------------------ through the CLI

TINY = ("train", "digits", "--epochs", "1", "--replicas", "1", "--stages", "1", "--shards",
        "1", "--hidden", "16", "--seed", "7", "--no-run-dir")  # fmt: skip


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of 1 epoch of digits (45 steps of 32), written by ``distbelief train``
    with no evaluations during training, a checkpoint only at the end and no fault."""
    root = tmp_path_factory.mktemp("cli") / "ck"
    assert main([*TINY, "--checkpoint-dir", str(root), "--json"]) == 0
    return root


def resume(capsys, cli_checkpoint: Path, tmp_path: Path, *flags: str) -> tuple[int, str, str]:
    root = tmp_path / "ck"
    shutil.copytree(cli_checkpoint, root)
    capsys.readouterr()
    code = main(["train", "--resume", str(root), "--no-run-dir", "--json", *flags])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--optimizer", "sgd"], "optimizer"),
        (["--lr", "0.1"], "lr"),
        (["--train-size", "1000"], "train-size"),
    ],
)
def test_the_command_refuses_another_update_rule_rate_or_training_set(
    capsys, cli_checkpoint, tmp_path, flags, named
):
    code, out, err = resume(capsys, cli_checkpoint, tmp_path, *flags)
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"distbelief: error: {named}: "), err


def test_the_command_takes_a_changed_eval_every_inject_and_checkpoint_every(
    capsys, cli_checkpoint, tmp_path
):
    """Resumed for a second epoch (steps 45-89, examples 1,438-2,876) with evaluations every
    300 examples, a checkpoint every 10 steps and a stage killed at step 60: the run takes all
    three (the checkpoint recorded none of them)."""
    code, out, err = resume(
        capsys, cli_checkpoint, tmp_path, "--epochs", "2", "--eval-every", "300",
        "--checkpoint-every", "10", "--inject", "kill:replica0.stage0@step=60",
    )  # fmt: skip
    assert code == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["resumed_from_update"] == 45 and s["updates_applied"] == 90
    assert (s["eval_every"], s["checkpoint_every"]) == (300, 10)
    # Past 1,500, 1,800, 2,100, 2,400 and 2,700 examples, and the final one.
    assert len(s["evaluations"]) == 6 and s["evaluations"][-1]["examples"] == 2876
    assert s["checkpoints_written"] == 5  # past steps 50, 60, 70, 80 (noticed late) and 90
    assert s["restarts"] == 1  # the injected kill fired
