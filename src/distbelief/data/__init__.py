"""What a run trains on: in-memory tensors (tensors), what train() accepts as data (inputs),
the bundled datasets (datasets), how examples are split over replicas (sharding), and data
files (formats: one module per format).

The names below are the data layer's public surface, as ``distbelief.data`` always offered them
(``from distbelief.data import mnist1d, files``)."""

from .inputs import (
    XOR_TABLE,
    XOR_TARGETS,
    Data,
    FileData,
    TensorRows,
    as_tensors,
    check_device,
    digits,
    epoch_order,
    files,
    mnist1d,
    replica_batches,
    replica_ranges,
    xor,
)

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
