"""Datasets and how they are split over replicas. Nothing is downloaded: data is generated or
ships inside an installed package."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .files import FileData, files

__all__ = ["FileData", "TensorRows", "files"]  # and the functions below

Data = tuple[torch.Tensor, torch.Tensor]
"""Inputs and targets, first dimension = examples."""


def as_tensors(data: object, name: str = "train_data") -> Data:
    """Accept ``(X, y)`` tensors/arrays or a torch ``Dataset`` of ``(x, y)`` pairs."""
    if isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"{name}: the Dataset must have a length") from None
        if n == 0:
            raise ConfigError(f"{name}: the dataset is empty")
        items = [data[i] for i in range(n)]
        try:
            xs = torch.stack([torch.as_tensor(x) for x, _ in items])
            ys = torch.stack([torch.as_tensor(y) for _, y in items])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"{name}: items must be (input, target) pairs of equal shapes: {exc}"
            ) from None
        check_device(xs, f"{name}: the inputs are")
        check_device(ys, f"{name}: the targets are")
        return xs, ys
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for v in data)
        if x.dim() == 0 or y.dim() == 0:
            raise ConfigError(f"{name}: inputs and targets need a first (example) dimension")
        if len(x) != len(y):
            raise ConfigError(f"{name}: {len(x)} inputs but {len(y)} targets")
        if len(x) == 0:
            raise ConfigError(f"{name}: the data is empty")
        for part, values in (("inputs", x), ("targets", y)):
            check_device(values, f"{name}: the {part} are")
        return x, y
    raise ConfigError(
        f"{name}: expected an (inputs, targets) pair or a torch Dataset, or the path of a data "
        f"file (.csv, .parquet, .npz, .npy); got {type(data).__name__}"
        + (f" {data!r}" if isinstance(data, str) else "")
    )


def check_device(values: torch.Tensor, what: str) -> None:
    """Refuse a tensor not on the CPU, naming ``what`` (e.g. ``"train_data: the inputs are"``)
    and its device: the actors and the parameter server hold CPU tensors (and a ``meta``
    tensor holds no values at all)."""
    if values.device.type != "cpu":
        hint = " (a meta tensor holds no values)" if values.device.type == "meta" else ""
        raise ConfigError(
            f"{what} on device {values.device.type!r}{hint}; distbelief trains on the CPU: "
            "pass CPU tensors (.cpu())"
        )


@dataclass(frozen=True)
class TensorRows:
    """In-memory examples, as a data shard holds them (a file is a :class:`FileData`)."""

    x: torch.Tensor
    """Inputs, first dimension = examples."""
    y: torch.Tensor
    """Targets, first dimension = examples."""

    def __len__(self) -> int:
        return len(self.x)

    def probe(self) -> Data:
        """The examples the checks before training look at: all of them."""
        return self.x, self.y

    def part(self, lo: int, hi: int) -> TensorRows:
        """Examples ``lo:hi`` (views, no copy)."""
        return TensorRows(self.x[lo:hi], self.y[lo:hi])

    def batches(self, order: torch.Tensor, batch_size: int) -> list[Data]:
        """One epoch's mini-batches in ``order``: one gather and one split, each mini-batch a
        view (never mutated: see messages)."""
        return list(zip(self.x[order].split(batch_size), self.y[order].split(batch_size)))


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


# ------------------------------------------------------------------------------- datasets


def mnist1d(num_samples: int = 10000, seed: int = 42) -> tuple[Data, Data]:
    """MNIST-1D generated locally by the ``mnist1d`` package (``make_dataset``, no download).

    Returns ``((X_train, y_train), (X_test, y_test))``; inputs are float32 of length 40.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset reseeds the global numpy/random generators; keep the caller's state.
    import random

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    to_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    to_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return (to_x(d["x"]), to_y(d["y"])), (to_x(d["x_test"]), to_y(d["y_test"]))


XOR_TABLE = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_TARGETS = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


def xor(num_samples: int = 50000, seed: int = 0) -> tuple[Data, Data]:
    """The seed's XOR example: random rows of the XOR truth table; the test set is the table."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 4, (num_samples,), generator=g)
    return (XOR_TABLE[idx], XOR_TARGETS[idx]), (XOR_TABLE.clone(), XOR_TARGETS.clone())


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Data, Data]:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])
