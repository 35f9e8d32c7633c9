"""Plain PyTorch loops: what a user without distbelief would write, timed the same way."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from typing import Any

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


def _half_loop(
    half: int,
    make_model: Callable[[int], nn.Module],
    data: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    batch_size: int,
    seed: int,
    out: Any,
) -> None:
    """(In a forked process.) The plain loop over every other example (from ``half``), in
    mini-batches of half of ``batch_size``: its seconds per mini-batch, put on ``out``."""
    torch.set_num_threads(1)
    x, y = data
    mine = (x[half::2], y[half::2])
    ex_s = plain_sgd_examples_per_s(
        make_model(seed), mine, lr=lr, batch_size=batch_size // 2, epochs=1, seed=seed
    )
    out.put(len(mine[0]) / ex_s / -(-len(x) // batch_size))


def two_plain_loops_s_per_batch(
    make_model: Callable[[int], nn.Module],
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    batch_size: int,
    seed: int,
    timeout: float = 900.0,
) -> float:
    """Two plain loops at once, each in a forked process with one torch thread and a model of
    its own, each over half of every mini-batch of ``batch_size`` (every other example):
    seconds per mini-batch of the slower. What 2 cores do for the same work as one loop over
    whole mini-batches when nothing passes between them: about what 2 partitions against 1
    can reach on this machine (cores that slow each other when both run share it)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    loops = [
        ctx.Process(
            target=_half_loop, args=(k, make_model, data, lr, batch_size, seed, out), daemon=True
        )
        for k in range(2)
    ]
    for loop in loops:
        loop.start()
    deadline, times = time.monotonic() + timeout, []
    try:
        while len(times) < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"two plain loops did not finish in {timeout:.0f} s")
            try:
                times.append(out.get(timeout=min(left, 1.0)))
            except queue.Empty:
                if any(loop.exitcode not in (None, 0) for loop in loops):
                    died = "a plain loop's process died before its time was in"
                    raise RuntimeError(died) from None
    finally:
        for loop in loops:
            if loop.is_alive():
                loop.kill()
            loop.join(timeout=10)
    return max(times)


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
