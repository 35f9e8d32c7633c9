"""Plain PyTorch loops: what a user without distbelief would write, timed the same way."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.inputs import replica_batches
from ..common import xor_net


def plain_sgd_examples_per_s(
    model: nn.Sequential,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    batch_size: int,
    epochs: int,
    seed: int,
) -> float:
    """A plain PyTorch loop over replica 0's batches (the engine's own order), timed with its
    per-epoch shuffle as the engine's data shard does it."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    batches = replica_batches(*data, replica=0, seed=seed, batch_size=batch_size, epochs=epochs)
    examples = 0
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        examples += len(xb)
    return examples / (time.perf_counter() - t0)


def plain_xor_seconds(data: tuple[torch.Tensor, torch.Tensor], seed: int, lr: float) -> float:
    """Seconds for a plain loop of single-example SGD steps over ``data``."""
    model = xor_net(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = data
    t0 = time.perf_counter()
    for i in range(len(x)):
        opt.zero_grad()
        F.mse_loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        opt.step()
    return time.perf_counter() - t0


def bare_adagrad_steps_per_s(n: int, steps: int, grads: Sequence[torch.Tensor], lr: float) -> float:
    """Steps/s of bare ``torch.optim.Adagrad`` on one tensor of ``n`` parameters."""
    param = nn.Parameter(torch.zeros(n))
    opt = torch.optim.Adagrad([param], lr=lr)
    t0 = time.perf_counter()
    for i in range(steps):
        param.grad = grads[i % len(grads)]
        opt.step()
    return steps / (time.perf_counter() - t0)
