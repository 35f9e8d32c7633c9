"""Raw NumPy arrays in a file (a ``.npy``, an uncompressed ``.npz`` member, a spilled part):
their headers, and their rows read by position without loading the rest."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import (
    CHUNK_BYTES,
    SCAN_ROWS,
    Chunk,
    DataFileChanged,
    DataFileError,
    Format,
    Layout,
    Span,
)


@dataclass(frozen=True)
class ArrayFile:
    """A C-ordered numeric array stored raw at ``offset`` in a file (a ``.npy``, or an
    uncompressed ``.npz`` member): rows are read without loading the rest."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    stamp: tuple[int, int] | None = None
    """``(size, mtime_ns)`` when the file was checked: a reader refuses a file that differs."""

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * math.prod(self.shape[1:]))

    def read_range(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` by a plain read (the pages stay in the OS cache, not in this process)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset + lo * self.row_bytes)
            count = (hi - lo) * math.prod(self.shape[1:])
            flat = np.fromfile(f, dtype=self.dtype, count=count)
        return flat.reshape((hi - lo, *self.shape[1:]))


def stamp(path: str) -> tuple[int, int]:
    """``(size, mtime_ns)`` of ``path`` now."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class MappedRows:
    """Gathers rows of an :class:`ArrayFile` with positioned reads, one per run of
    consecutive rows, into the result: the pages stay in the OS cache and out of this
    process's RSS. Not a memory map: a file truncated while mapped kills the process with
    SIGBUS (no message, nothing kept), where a short read is an error that names the file.
    (Mapped, each row read also brought the pages around it into RSS: 4,096 random rows of a
    400 MB file mapped 390 MB.) Each read first compares the file's size and modification time
    with those it had when checked, so a file rewritten under a run is refused, not read."""

    def __init__(self, array: ArrayFile) -> None:
        self.array = array
        self._file = open(array.path, "rb")  # noqa: SIM115 - lives as long as the reader
        self._row_bytes = array.row_bytes

    def __del__(self) -> None:
        # The reader lives as long as the data that opened it; close its file with it.
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def _check(self) -> None:
        if self.array.stamp is None:
            return
        st = os.fstat(self._file.fileno())
        if (st.st_size, st.st_mtime_ns) != self.array.stamp:
            size = self.array.stamp[0]
            how = "shrank" if st.st_size < size else "changed"
            raise DataFileChanged(
                f"{self.array.path}: the file {how} while training ({size:,} bytes when checked, "
                f"{st.st_size:,} now); train again on a file that stays as it is"
            )

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted) as a new array."""
        self._check()
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=self.array.dtype)
        if len(rows) == 0:
            return out
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [len(rows)])).tolist()
        fd, size, base = self._file.fileno(), self._row_bytes, self.array.offset
        for a, b, row in zip(starts, ends, rows[starts].tolist()):
            want = (b - a) * size
            got = os.preadv(fd, [buffer[a * size : b * size]], base + row * size)
            if got != want:
                self._check()  # it shrank since the check above: say so
                raise DataFileChanged(
                    f"{self.array.path}: the file is shorter than its header says"
                )
        return out


def _npy_header(f: Any, where: str) -> tuple[str, tuple[int, ...], bool]:
    try:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f)
    except (ValueError, OSError) as exc:
        raise DataFileError(f"{where}: not a NumPy array file ({exc})") from None
    return dtype.str, tuple(shape), fortran


def array_file(path: str, offset: int, where: str) -> ArrayFile:
    """The array whose ``.npy`` header starts at ``offset`` in ``path``, checked to be numeric,
    C-ordered and not a scalar; ``where`` names it in messages."""
    with open(path, "rb") as f:
        f.seek(offset)
        dtype, shape, fortran = _npy_header(f, where)
        start = f.tell()
    if np.dtype(dtype).kind not in "biuf":
        raise DataFileError(f"{where}: dtype {np.dtype(dtype)} is not numeric")
    if fortran and len(shape) > 1:
        raise DataFileError(
            f"{where}: stored in Fortran order; save it with np.ascontiguousarray to read rows"
        )
    if not shape:
        raise DataFileError(f"{where}: a scalar, not an array of examples")
    return ArrayFile(path, start, dtype, shape, stamp(path))


class ArrayPair(Format):
    """A format that stores inputs and targets as two arrays (``.npy`` pairs, ``.npz``): their
    rows are read by position where both are stored raw, else streamed from the loaded arrays.
    A subclass says where the arrays are."""

    def target_of(self, path: str, target: str | None) -> str:
        """The target as given, or the format's default for ``path``."""
        raise NotImplementedError

    def arrays(self, path: str, target: str) -> tuple[ArrayFile | np.ndarray, ...]:
        """The inputs and the targets, each an :class:`ArrayFile` or a loaded array."""
        raise NotImplementedError

    def layout(self, path: str, target: str | None) -> Layout:
        """Both arrays, refused unless they have as many rows."""
        target = self.target_of(path, target)
        x, y = self.arrays(path, target)
        if x.shape[0] != y.shape[0]:
            raise DataFileError(f"{path}: {x.shape[0]} inputs but {y.shape[0]} targets ({target})")
        both_files = all(isinstance(a, ArrayFile) for a in (x, y))
        return Layout(target, arrays=(x, y) if both_files else ())

    def chunks(self, path: str, layout: Layout, span: Span | None = None) -> Iterator[Chunk]:
        """All rows, from the start, at most :data:`SCAN_ROWS` rows or :data:`CHUNK_BYTES` of
        inputs at a time."""
        x, y = self.arrays(path, layout.target)
        n = x.shape[0]
        row_bytes = max(x[:1].nbytes if isinstance(x, np.ndarray) else x.row_bytes, 1)
        step = max(1, min(SCAN_ROWS, CHUNK_BYTES // row_bytes))
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            xs = x[lo:hi] if isinstance(x, np.ndarray) else x.read_range(lo, hi)
            ys = y[lo:hi] if isinstance(y, np.ndarray) else y.read_range(lo, hi)
            yield lo, xs.reshape(hi - lo, -1), ys
