"""Helpers shared by test modules (test modules never import each other)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from distbelief.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command in-process; returns (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """Run the command with ``--json``; it must succeed; returns its last line, parsed."""
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def logistic(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Multinomial logistic regression on MNIST-1D's 40 inputs, from zero: the convex test's
    model (one optimum, so L-BFGS runs can be compared with each other and with torch's)."""
    model = nn.Sequential(nn.Linear(40, 10, dtype=dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model
