"""Examples in memory: an ``(inputs, targets)`` pair of CPU tensors, and the rows a data shard
holds (a file's are a ``files.FileData``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

Data = tuple[torch.Tensor, torch.Tensor]
"""Inputs and targets, first dimension = examples."""


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
