"""What a run trains on: in-memory tensors, a torch ``Dataset`` or a data file, and where the
data layer's names are found (the bundled datasets, the split over replicas, files)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .datasets import XOR_TABLE, XOR_TARGETS, digits, mnist1d, xor
from .formats import FileData, files, suffixes
from .sharding import epoch_order, replica_batches, replica_ranges
from .tensors import Data, TensorRows, check_device

__all__ = [
    "XOR_TABLE",
    "XOR_TARGETS",
    "Data",
    "FileData",
    "TensorRows",
    "as_tensors",
    "check_device",
    "digits",
    "epoch_order",
    "files",
    "mnist1d",
    "replica_batches",
    "replica_ranges",
    "xor",
]


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
        f"file ({', '.join(suffixes())}); got {type(data).__name__}"
        + (f" {data!r}" if isinstance(data, str) else "")
    )
