"""A checked data file as a run holds it: :class:`FileData`, a picklable view of some of its
rows that a data shard is given with its part and reads itself, lazily, in the process it runs
in. Rows stored raw at known offsets (``.npy``, uncompressed ``.npz``) are read by position;
any other file is streamed once by its format and only the view's rows are kept."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .arrays import ArrayFile, MappedRows
from .base import CLASSIFY, Chunk, DataFileError, Layout, named

IN_MEMORY_PART_BYTES = 64 << 20
"""A CSV/Parquet part up to this size is kept in memory; a larger one goes to a temp file."""


@dataclass(frozen=True, eq=False)
class FileData:
    """A checked data file, or a view of some of its rows: what a data shard needs to read its
    part itself. Picklable (no open files); readers open lazily in the process that reads.

    Make one with :func:`files`; ``len()`` is its number of examples.
    """

    path: str
    """The file (absolute). For ``.npy`` pairs, the inputs' file."""
    format: str
    """``csv``, ``parquet``, ``npz`` or ``npy``."""
    target: str
    """The label column (CSV, Parquet), the label array (``.npz``) or the labels' ``.npy``."""
    task: str
    """``classify`` (integer labels, one per example) or ``regress`` (float targets)."""
    length: int
    """Examples in this view."""
    width: int
    """Features per example (the model's input width)."""
    outputs: int
    """Classes (classify: the largest label + 1) or target values per example (regress)."""
    columns: tuple[str, ...] = ()
    """Feature columns, in order (CSV, Parquet)."""
    probe_rows: tuple[int, ...] = ()
    """Rows of this view that decide the loss checks (the first ones and the label extremes)."""
    rows: np.ndarray | None = None
    """File rows of this view, sorted; None means ``start .. start + length``."""
    start: int = 0
    """First file row of this view when ``rows`` is None."""
    dtype: torch.dtype = torch.float32
    """Dtype of the inputs read (and of regression targets): the model's."""
    arrays: tuple[Any, ...] = ()
    """Where the inputs and targets are stored (``ArrayFile``), or () if read by streaming."""
    task_reason: str = ""
    """Why this task: given, or what in the labels decided it (shown to the user)."""
    _reader: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # an open map or file is the reading process's own
        return state

    # ---------------------------------------------------------------- views

    def part(self, lo: int, hi: int) -> FileData:
        """The view of this view's examples ``lo:hi`` (a replica's part)."""
        if self.rows is not None:
            return replace(self, rows=self.rows[lo:hi], length=hi - lo, probe_rows=(), _reader=None)
        return replace(self, start=self.start + lo, length=hi - lo, probe_rows=(), _reader=None)

    def split(self, fraction: float, seed: int = 0) -> tuple[FileData, FileData]:
        """``(train, test)``: a seeded random ``fraction`` of the examples held out for testing
        (the same rows for the same seed, whatever the run's seed)."""
        if not 0.0 < fraction < 1.0:
            raise DataFileError(f"test split must be between 0 and 1, got {fraction}")
        n_test = round(self.length * fraction)
        if n_test < 1 or n_test >= self.length:
            raise DataFileError(
                f"a test split of {fraction} of {self.length} examples leaves an empty part"
            )
        view = self._file_rows(np.arange(self.length))
        pick = np.zeros(self.length, dtype=bool)
        pick[np.random.default_rng(seed).choice(self.length, n_test, replace=False)] = True
        views = []
        for rows in (view[~pick], view[pick]):
            part = replace(self, rows=rows, length=len(rows), _reader=None)
            views.append(replace(part, probe_rows=part._find_probe()))
        return views[0], views[1]

    def with_dtype(self, dtype: torch.dtype) -> FileData:
        """The same data read as ``dtype`` (the model's)."""
        return self if dtype == self.dtype else replace(self, dtype=dtype, _reader=None)

    def _file_rows(self, index: np.ndarray) -> np.ndarray:
        return self.rows[index] if self.rows is not None else index + self.start

    # ---------------------------------------------------------------- reading

    def read(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``index`` of this view (an integer array in any order, or a range), as
        ``(inputs, targets)`` tensors in that order."""
        index = np.asarray(index, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        x, y = self._reader_().take(index[order])  # reads go in file order
        if not np.array_equal(order, np.arange(len(order))):
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            x, y = x[back], y[back]
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        xt = torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1), dtype=np_dtype))
        if self.task == CLASSIFY:
            yt = torch.from_numpy(np.ascontiguousarray(y.reshape(len(y)), dtype=np.int64))
        else:
            yt = torch.from_numpy(np.ascontiguousarray(y.reshape(len(y), -1), dtype=np_dtype))
        return xt, yt

    def batches(self, order: torch.Tensor, batch_size: int) -> Any:
        """One epoch's mini-batches in ``order``. A small part (up to 64 MiB of inputs) is
        gathered once an epoch, as in-memory tensors are (a read per mini-batch cost ~10% of
        a small model's throughput); a larger one is read a mini-batch at a time."""
        if self.length * self.width * 4 <= IN_MEMORY_PART_BYTES:
            x, y = self.read(order.numpy())
            return list(zip(x.split(batch_size), y.split(batch_size)))
        return _Batches(self, order.numpy(), batch_size)

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All examples in order, ``size`` at a time."""
        for lo in range(0, self.length, size):
            yield self.read(np.arange(lo, min(lo + size, self.length)))

    def probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A few examples that stand for the whole view in the loss checks: the first two and
        the rows with the smallest and largest label (classify) or a target other than 0/1."""
        return self.read(np.asarray(self.probe_rows or (0,), dtype=np.int64))

    def _find_probe(self) -> tuple[int, ...]:
        """Probe rows of a new view, found in one streaming pass (nothing kept)."""
        wanted = self._file_rows(np.arange(self.length))
        probe = {0, min(1, self.length - 1)}
        lo: tuple[float, int] | None = None
        hi: tuple[float, int] | None = None
        other: int | None = None
        for first, _, y in _stream(self):
            a, b = (int(v) for v in np.searchsorted(wanted, [first, first + len(y)]))
            if b <= a:
                continue
            yy = y[wanted[a:b] - first].reshape(b - a, -1).astype(np.float64)
            i, j = int(yy[:, 0].argmin()), int(yy[:, 0].argmax())
            if lo is None or yy[i, 0] < lo[0]:
                lo = (float(yy[i, 0]), a + i)
            if hi is None or yy[j, 0] > hi[0]:
                hi = (float(yy[j, 0]), a + j)
            not01 = ((yy != 0) & (yy != 1)).any(axis=1)
            if other is None and not01.any():
                other = a + int(np.argmax(not01))
        if self.task == CLASSIFY:
            probe.update(v[1] for v in (lo, hi) if v is not None)
        elif other is not None:
            probe.add(other)
        return tuple(sorted(probe))

    def _reader_(self) -> Any:
        if self._reader is None:
            reader = _open_reader(self)
            object.__setattr__(self, "_reader", reader)
        return self._reader


class _Batches:
    """A lazy list of an epoch's mini-batches: the data shard asks for one at a time."""

    def __init__(self, data: FileData, order: np.ndarray, batch_size: int) -> None:
        self.data, self.order, self.batch_size = data, order, batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.read(self.order[i * self.batch_size : (i + 1) * self.batch_size])


class _ArrayReader:
    """Rows of a view over memory-mapped arrays (``.npy``, uncompressed ``.npz``)."""

    def __init__(self, data: FileData) -> None:
        self.data = data
        self.x, self.y = (MappedRows(a) for a in data.arrays)

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = self.data._file_rows(index)
        return self.x.take(rows), self.y.take(rows)


class _PartReader:
    """Rows of a view of a file that cannot be read by row (CSV, Parquet, compressed
    ``.npz``): the file is streamed once and only this view's rows are kept, in memory when
    small, else in an unlinked temporary file that is mapped."""

    def __init__(self, data: FileData) -> None:
        n = data.length
        wanted = data._file_rows(np.arange(n))  # sorted
        x_bytes = n * data.width * 4
        if x_bytes <= IN_MEMORY_PART_BYTES:
            xs, ys = [], []
            for first, x, y in _stream(data):
                lo, hi = np.searchsorted(wanted, [first, first + len(x)])
                if hi > lo:
                    xs.append(x[wanted[lo:hi] - first].astype(np.float32))
                    ys.append(y[wanted[lo:hi] - first])
            self.x, self.y = np.concatenate(xs), np.concatenate(ys)
            self._mapped = None
        else:
            self._mapped = self._spill(data, wanted)

    def _spill(self, data: FileData, wanted: np.ndarray) -> tuple[MappedRows, MappedRows]:
        spill_dir = tempfile.gettempdir()
        arrays = []
        handles = []
        for _ in range(2):
            fd, path = tempfile.mkstemp(prefix="distbelief-part-", dir=spill_dir)
            handles.append((os.fdopen(fd, "wb"), path))
        y_dtype, y_shape = None, ()
        count = 0
        try:
            for first, x, y in _stream(data):
                lo, hi = np.searchsorted(wanted, [first, first + len(x)])
                if hi > lo:
                    sel = wanted[lo:hi] - first
                    handles[0][0].write(np.ascontiguousarray(x[sel], dtype=np.float32).tobytes())
                    yy = np.ascontiguousarray(y[sel])
                    y_dtype, y_shape = yy.dtype.str, yy.shape[1:]
                    handles[1][0].write(yy.tobytes())
                    count += hi - lo
            for f, _ in handles:
                f.close()
            arrays = [
                ArrayFile(handles[0][1], 0, np.dtype(np.float32).str, (count, data.width)),
                ArrayFile(handles[1][1], 0, y_dtype or "<i8", (count, *y_shape)),
            ]
            return tuple(MappedRows(a) for a in arrays)  # type: ignore[return-value]
        finally:
            for f, path in handles:
                f.close()
                os.unlink(path)  # the maps keep the data; nothing is left on disk at exit

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._mapped is not None:
            return self._mapped[0].take(index), self._mapped[1].take(index)
        return self.x[index], self.y[index]


def _open_reader(data: FileData) -> Any:
    return _ArrayReader(data) if data.arrays else _PartReader(data)


# ------------------------------------------------------------------------------ streaming


def _stream(data: FileData) -> Iterator[Chunk]:
    """``(first file row, inputs, targets)`` chunks of the file, in order, covering at least
    this view's rows (Parquet: only the row groups that hold them); the targets are int64
    labels (classify) or float64 ``(rows, k)`` (regress)."""
    rows = data._file_rows(np.array([0, data.length - 1])) if data.length else None
    span = (int(rows[0]), int(rows[1]) + 1) if rows is not None else None
    chunks = named(data.format).chunks(data.path, Layout(data.target, data.columns), span)
    for first, x, y in chunks:
        if data.task == CLASSIFY:
            y = y.reshape(len(y)).astype(np.int64)
        else:
            y = y.reshape(len(y), -1).astype(np.float64)
        yield first, x, y
