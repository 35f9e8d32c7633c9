"""Hogwild on one machine: the asynchronous baseline a single-machine user would pick.

PyTorch's documented pattern (``mnist_hogwild``): one model whose parameters are moved to
shared memory (``share_memory()``), one ``torch.multiprocessing`` process per worker, each with
its own optimizer stepping the shared parameters without any lock. Here with distbelief's
main-job setting so the two compare like with like: MNIST-1D, MLP 40-256-256-10, batch 32,
Adagrad at lr 0.05, each worker on its own contiguous part of the training set reshuffled every
epoch exactly as a distbelief data shard does (``distbelief.data.inputs.epoch_order``), one torch
thread per worker. ``distbelief bench --only hogwild`` runs it side by side with distbelief;
``python benchmarks/hogwild.py`` runs it on its own.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ...data.inputs import epoch_order, replica_ranges


def _work(
    rank: int,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """One worker: Adagrad of its own on the shared parameters, over its own part of the data."""
    torch.set_num_threads(1)
    opt = torch.optim.Adagrad(model.parameters(), lr=lr)
    ready.put(rank)
    go.wait()  # all workers start together: the timed phase is training only
    t0 = time.perf_counter()
    examples = 0
    for epoch in range(epochs):
        order = epoch_order(len(x), seed, rank, epoch)
        for xb, yb in zip(x[order].split(batch_size), y[order].split(batch_size)):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            examples += len(xb)
    results.put((rank, t0, time.perf_counter(), examples))


def hogwild(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    workers: int = 2,
    lr: float = 0.05,
    batch_size: int = 32,
    epochs: int = 1,
    seed: int = 0,
    timeout_s: float = 600.0,
) -> dict[str, float]:
    """Train ``model`` in place, Hogwild style; returns training examples/s (first worker's
    start to last worker's end), the training seconds and the whole call's seconds."""
    t_call = time.perf_counter()
    x, y = data
    model.share_memory()
    # The first optimizer a process builds imports torch's compiler stack (seconds): build one
    # here, so the forked workers inherit it instead of each paying it.
    torch.optim.Adagrad([nn.Parameter(torch.zeros(1))], lr=lr)
    ctx = mp.get_context("fork")  # the parent has imported torch: a forked worker starts at once
    ready, results, go = ctx.SimpleQueue(), ctx.SimpleQueue(), ctx.Event()
    procs = []
    for rank, (lo, hi) in enumerate(replica_ranges(len(x), workers)):
        args = (rank, model, x[lo:hi], y[lo:hi], batch_size, epochs, lr, seed, ready, go, results)
        procs.append(ctx.Process(target=_work, args=args, daemon=True))
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get()
        go.set()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode != 0:
                raise RuntimeError(f"hogwild worker {p.pid} ended with exit code {p.exitcode}")
        runs = [results.get() for _ in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    t0, t1 = min(r[1] for r in runs), max(r[2] for r in runs)
    examples = sum(r[3] for r in runs)
    return {
        "examples_per_s": examples / (t1 - t0),
        "train_s": t1 - t0,
        "wall_s": time.perf_counter() - t_call,
        "examples": examples,
    }
