"""How examples are split over replicas: a contiguous part each, visited in a seeded order
that is a pure function of (seed, replica, epoch)."""

from __future__ import annotations

import numpy as np
import torch

from .tensors import Data


def replica_ranges(n: int, replicas: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal parts of ``n`` examples, one per replica (the seed's split)."""
    bounds = [r * n // replicas for r in range(replicas + 1)]
    return [(bounds[r], bounds[r + 1]) for r in range(replicas)]


def epoch_order(n: int, seed: int, replica: int, epoch: int) -> torch.Tensor:
    """The order in which a replica visits its ``n`` examples in one epoch (seeded, pure)."""
    state = np.random.SeedSequence([seed, replica, epoch]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randperm(n, generator=g)


def replica_batches(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    replica: int,
    seed: int,
    batch_size: int,
    epochs: int,
) -> list[Data]:
    """Every mini-batch a replica's data shard sends, in order (for oracles and tests)."""
    out = []
    for epoch in range(epochs):
        order = epoch_order(len(inputs), seed, replica, epoch)
        xs, ys = inputs[order], targets[order]
        starts = range(0, len(xs), batch_size)
        out.extend((xs[i : i + batch_size], ys[i : i + batch_size]) for i in starts)
    return out
