"""Data files as training data: CSV, Parquet, ``.npz`` and ``.npy`` pairs.

:func:`files` checks a file in one streaming pass (chunks, never the whole file in memory) and
returns a :class:`FileData`: a small picklable description (path, rows, widths, task) that each
data shard is given with its row range and reads itself, lazily, in the process it runs in (on
Ray: on its own node). Rows of ``.npy`` files and uncompressed ``.npz`` members are read
on demand with positioned reads (never memory-mapped: a mapped page of a file that shrinks
under the reader kills the process with SIGBUS, which Python cannot catch); CSV, Parquet and
compressed ``.npz`` cannot be indexed by row, so a data shard streams the file once and keeps
only its own part (in memory when small, else in an unlinked temporary file).

Every problem is a :class:`DataFileError` naming the file and where (CSV: line and column;
arrays and Parquet: row, counted from 0).
"""

from __future__ import annotations

import csv
import errno
import math
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError

CLASSIFY, REGRESS = "classify", "regress"
TASKS = (CLASSIFY, REGRESS)
FORMATS = (".csv", ".parquet", ".npz", ".npy")
MAX_INFERRED_CLASSES = 1000
"""Whole-number targets in 0..999 (``1`` or ``1.0``) are inferred to be class labels; anything
else is regression."""
SCAN_ROWS = 65536
"""Rows per chunk of the checking pass and of a data shard's streaming read."""
IN_MEMORY_PART_BYTES = 64 << 20
"""A CSV/Parquet part up to this size is kept in memory; a larger one goes to a temp file."""
CHUNK_BYTES = 8 << 20
"""At most this much of an array file is read at a time by the checking pass."""


class DataFileError(Exception):
    """A data file that cannot be used; the message names the file and where."""


class DataFileChanged(DataFileError):
    """A data file changed or shrank after it was checked (found while training)."""


# ------------------------------------------------------------------------------ row readers


@dataclass(frozen=True)
class _ArrayFile:
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


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class _MappedRows:
    """Gathers rows of an :class:`_ArrayFile` with positioned reads, one per run of
    consecutive rows, into the result: the pages stay in the OS cache and out of this
    process's RSS. Not a memory map: a file truncated while mapped kills the process with
    SIGBUS (no message, nothing kept), where a short read is an error that names the file.
    (Mapped, each row read also brought the pages around it into RSS: 4,096 random rows of a
    400 MB file mapped 390 MB.) Each read first compares the file's size and modification time
    with those it had when checked, so a file rewritten under a run is refused, not read."""

    def __init__(self, array: _ArrayFile) -> None:
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


# ------------------------------------------------------------------------------ FileData


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
    """Where the inputs and targets are stored (``_ArrayFile``), or () if read by streaming."""
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
        self.x, self.y = (_MappedRows(a) for a in data.arrays)

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

    def _spill(self, data: FileData, wanted: np.ndarray) -> tuple[_MappedRows, _MappedRows]:
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
                _ArrayFile(handles[0][1], 0, np.dtype(np.float32).str, (count, data.width)),
                _ArrayFile(handles[1][1], 0, y_dtype or "<i8", (count, *y_shape)),
            ]
            return tuple(_MappedRows(a) for a in arrays)  # type: ignore[return-value]
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


def _stream(data: FileData) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(first file row, inputs, targets)`` chunks of the file, in order, covering at least
    this view's rows (Parquet: only the row groups that hold them); the targets are int64
    labels (classify) or float64 ``(rows, k)`` (regress)."""
    rows = data._file_rows(np.array([0, data.length - 1])) if data.length else None
    span = (int(rows[0]), int(rows[1]) + 1) if rows is not None else None
    for first, x, y in _chunks(data.path, data.format, data.target, data.columns, span):
        if data.task == CLASSIFY:
            y = y.reshape(len(y)).astype(np.int64)
        else:
            y = y.reshape(len(y), -1).astype(np.float64)
        yield first, x, y


def _chunks(
    path: str,
    fmt: str,
    target: str,
    columns: tuple[str, ...],
    span: tuple[int, int] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    if fmt == "csv":
        yield from _csv_chunks(path, target, columns)
    elif fmt == "parquet":
        yield from _parquet_chunks(path, target, columns, span)
    else:
        xa, ya = _locate_arrays(path, fmt, target)
        n = xa.shape[0]
        row_bytes = max(xa[:1].nbytes if isinstance(xa, np.ndarray) else xa.row_bytes, 1)
        step = max(1, min(SCAN_ROWS, CHUNK_BYTES // row_bytes))
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            x = xa[lo:hi] if isinstance(xa, np.ndarray) else xa.read_range(lo, hi)
            y = ya[lo:hi] if isinstance(ya, np.ndarray) else ya.read_range(lo, hi)
            yield lo, x.reshape(hi - lo, -1), y


def _csv_chunks(
    path: str, target: str, columns: tuple[str, ...]
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    types = {c: pa.float64() for c in columns}
    types[target] = pa.string()  # cast below: integers (labels) or floats (regression)
    first = 0
    try:
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=1 << 20),
            convert_options=pcsv.ConvertOptions(
                null_values=[""],  # only an empty cell is missing; "nan" is a NaN, refused below
                column_types=types,
                include_columns=[*columns, target],
            ),
        )
        for batch in reader:
            if any(batch.column(c).null_count for c in columns):
                raise pa.ArrowInvalid("an empty cell")
            x = (
                np.column_stack([batch.column(c).to_numpy(zero_copy_only=False) for c in columns])
                if columns
                else np.empty((batch.num_rows, 0))
            )
            labels = batch.column(target)
            try:
                y = pc.cast(labels, pa.int64()).to_numpy(zero_copy_only=False)
            except pa.ArrowInvalid:
                y = pc.cast(labels, pa.float64()).to_numpy(zero_copy_only=False)
            yield first, x, y
            first += batch.num_rows
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        where = _csv_locate(path, target)
        raise DataFileError(where or f"{path}: {str(exc).splitlines()[0]}") from None


def _csv_locate(path: str, target: str) -> str | None:
    """The first bad cell of a CSV file, with its line (the slow, exact search that runs only
    after the fast reader failed)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader)
        while True:
            line = reader.line_num + 1  # a record may span lines: name the one it starts on
            row = next(reader, None)
            if row is None:
                break
            if len(row) != len(header):
                return f"{path} line {line}: {len(row)} fields, but the header has {len(header)}"
            for name, cell in zip(header, row):
                text = cell.strip()
                if not text:
                    return f"{path} line {line}, column {name!r}: empty cell"
                try:
                    value = float(text)
                except ValueError:
                    return f"{path} line {line}, column {name!r}: {cell!r} is not a number"
                if not math.isfinite(value):
                    return f"{path} line {line}, column {name!r}: NaN or Inf"
    return None


def _parquet_chunks(
    path: str, target: str, columns: tuple[str, ...], span: tuple[int, int] | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Batches of the row groups that overlap ``span`` (file rows ``lo:hi``; None: all)."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    sizes = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
    starts = np.concatenate(([0], np.cumsum(sizes)))
    groups = list(range(len(sizes)))
    if span is not None:
        groups = [g for g in groups if starts[g] < span[1] and starts[g + 1] > span[0]]
    first = int(starts[groups[0]]) if groups else 0
    for batch in f.iter_batches(
        batch_size=SCAN_ROWS, row_groups=groups, columns=[*columns, target]
    ):
        for name in (*columns, target):
            col = batch.column(name)
            if col.null_count:
                row = first + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataFileError(f"{path} row {row}, column {name!r}: missing value (null)")
        x = (
            np.column_stack(
                [batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in columns]
            )
            if columns
            else np.empty((batch.num_rows, 0))
        )
        y = batch.column(target).to_numpy(zero_copy_only=False)
        yield first, x, y
        first += batch.num_rows


# ------------------------------------------------------------------------------ arrays


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


def _array_file(path: str, offset: int, where: str) -> _ArrayFile:
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
    return _ArrayFile(path, start, dtype, shape, _stamp(path))


def _npz_member(path: str, name: str) -> _ArrayFile | np.ndarray:
    """An ``.npz`` member: mapped in place if stored uncompressed, else loaded."""
    try:
        with zipfile.ZipFile(path) as z:
            members = {n.removesuffix(".npy"): z.getinfo(n) for n in z.namelist()}
            if name not in members:
                have = ", ".join(sorted(members)) or "none"
                raise DataFileError(f"{path}: no array {name!r}; the arrays are {have}")
            info = members[name]
            if info.compress_type != zipfile.ZIP_STORED:
                with z.open(info) as f:
                    arr = np.lib.format.read_array(f, allow_pickle=False)
                if arr.dtype.kind not in "biuf" or arr.ndim == 0:
                    raise DataFileError(f"{path} array {name!r}: not a numeric array of examples")
                return arr
        with open(path, "rb") as f:  # the member's data follows its local header
            f.seek(info.header_offset)
            head = f.read(30)
            name_len, extra_len = struct.unpack("<HH", head[26:30])
        return _array_file(path, info.header_offset + 30 + name_len + extra_len,
                           f"{path} array {name!r}")  # fmt: skip
    except zipfile.BadZipFile:
        raise DataFileError(f"{path}: not an .npz file (not a zip archive)") from None
    except ValueError as exc:
        raise DataFileError(f"{path} array {name!r}: {exc}") from None


def _locate_arrays(path: str, fmt: str, target: str) -> tuple[Any, Any]:
    if fmt == "npz":
        return _npz_member(path, "x"), _npz_member(path, target)
    if not os.path.exists(target):
        raise DataFileError(f"{target}: no such file (the labels for {path})")
    return _array_file(path, 0, path), _array_file(target, 0, target)


def _npy_labels(path: str) -> str:
    """``x.npy`` -> ``y.npy``; ``train_x.npy`` -> ``train_y.npy``."""
    head, name = os.path.split(path)
    stem = name[: -len(".npy")]
    if not stem.endswith("x"):
        raise DataFileError(
            f"{path}: name the inputs x.npy (or *x.npy) and the labels y.npy beside it, "
            "or give the labels' file as the target"
        )
    return os.path.join(head, stem[:-1] + "y.npy")


# ------------------------------------------------------------------------------ checking


def files(
    path: str | os.PathLike[str], target: str | None = None, task: str | None = None
) -> FileData:
    """A data file, checked in one streaming pass, ready to be read part by part.

    ``path``: a ``.csv`` (header row), ``.parquet``, ``.npz`` (arrays ``x`` and ``y``) or
    ``.npy`` (inputs; the labels are ``y.npy`` beside an ``x.npy``). ``target``: the label
    column (CSV, Parquet; default the last column), the label array (``.npz``; default ``y``)
    or the labels' file (``.npy``). ``task``: ``"classify"`` or ``"regress"``; by default
    whole-number labels in 0..999 are classes and anything else is regressed (``.task_reason``
    says why).

    Raises :class:`ConfigError` starting ``path:`` and naming the file and where.
    """
    try:
        return scan(path, target, task)
    except DataFileError as exc:
        raise ConfigError(f"path: {exc}") from None


def scan(
    path: str | os.PathLike[str],
    target: str | None = None,
    task: str | None = None,
    like: FileData | None = None,
) -> FileData:
    """:func:`files` raising :class:`DataFileError` (the message without a parameter name).

    ``like``: the training data this file is tested against. Its target and task are the
    defaults, and named columns are matched by name, in the training file's order: a column
    of one file missing from the other is an error naming it."""
    path = os.path.abspath(os.fspath(path))
    origin = "given" if task is not None else None
    if like is not None:
        origin = origin or f"as the training data ({os.path.basename(like.path)})"
        task = task or like.task
        npy = os.path.splitext(path)[1].lower() == ".npy"
        if target is None and like.format != "npy" and not npy:
            target = like.target  # a .npy's labels are found beside it
    if task is not None and task not in TASKS:
        raise DataFileError(f"task must be {' or '.join(TASKS)}, got {task!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS and not os.path.isdir(path):
        raise DataFileError(
            f"{path}: unknown format {ext or '(no extension)'!r}; use {', '.join(FORMATS)}"
        )
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataFileError(f"{path}: a loop of symbolic links, not a file") from None
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise DataFileError(f"{path}: a symbolic link to {os.readlink(path)!r}, which does "
                                "not exist") from None  # fmt: skip
        if exc.errno != errno.ENOENT:
            raise DataFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if os.path.isdir(path):
        raise DataFileError(f"{path}: a directory, not a file")
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise DataFileError(f"{path}: not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise DataFileError(f"{path}: the file is empty")
    fmt = ext[1:]
    columns: tuple[str, ...] = ()
    arrays: tuple[Any, ...] = ()
    try:
        if fmt == "csv":
            target, columns = _csv_columns(path, target)
        elif fmt == "parquet":
            target, columns = _parquet_columns(path, target)
        if columns and like is not None and like.columns:
            columns = _match_columns(path, columns, like)
        if fmt not in ("csv", "parquet"):
            if fmt == "npy":
                target = os.path.abspath(target) if target else _npy_labels(path)
            else:
                target = target or "y"
            xa, ya = _locate_arrays(path, fmt, target)
            if xa.shape[0] != ya.shape[0]:
                raise DataFileError(
                    f"{path}: {xa.shape[0]} inputs but {ya.shape[0]} targets ({target})"
                )
            if all(isinstance(a, _ArrayFile) for a in (xa, ya)):
                arrays = (xa, ya)
        stats = _Stats(path, fmt, task, columns, origin)
        for first, x, y in _chunks(path, fmt, target, columns):
            stats.add(first, x, y)
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return stats.finish(target, columns, arrays)


def _match_columns(path: str, columns: tuple[str, ...], like: FileData) -> tuple[str, ...]:
    """``like``'s feature columns, checked against this file's by name (any order)."""
    missing = [c for c in like.columns if c not in columns]
    extra = [c for c in columns if c not in like.columns]
    if missing:
        raise DataFileError(
            f"{path}: no column {missing[0]!r}, which the training data ({like.path}) has"
            + (f" ({len(missing)} such columns)" if len(missing) > 1 else "")
        )
    if extra:
        raise DataFileError(
            f"{path}: column {extra[0]!r} is not in the training data ({like.path})"
            + (f" ({len(extra)} such columns)" if len(extra) > 1 else "")
        )
    return like.columns  # read in the training file's order, whatever this file's is


def _csv_columns(path: str, target: str | None) -> tuple[str, tuple[str, ...]]:
    try:
        # utf-8-sig: spreadsheets write "CSV UTF-8" with a byte-order mark, not part of a name
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError:
        raise DataFileError(f"{path} line 1: not text (is it really a CSV file?)") from None
    if not header or not any(h.strip() for h in header):
        raise DataFileError(f"{path}: the file is empty (no header row)")
    return _pick_target(path, list(header), target)


def _parquet_columns(path: str, target: str | None) -> tuple[str, tuple[str, ...]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise DataFileError(f"{path}: not a Parquet file ({exc})") from None
    target, columns = _pick_target(path, list(schema.names), target)
    for name in (*columns, target):
        t = schema.field(name).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise DataFileError(f"{path}, column {name!r}: type {t} is not numeric")
    return target, columns


def _pick_target(path: str, names: list[str], target: str | None) -> tuple[str, tuple[str, ...]]:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataFileError(
                f"{path}: column {name!r} appears twice (columns {seen[name] + 1} and {i + 1}); "
                "give every column its own name"
            )
        seen[name] = i
    if target is None:
        target = names[-1]
    elif target not in names:
        shown = ", ".join(map(repr, names[:12]))
        more = f" and {len(names) - 12} more" if len(names) > 12 else ""
        raise DataFileError(f"{path}: no column {target!r}; the columns are {shown}{more}")
    columns = tuple(n for n in names if n != target)
    if not columns:
        raise DataFileError(f"{path}: only the target column {target!r}, no features")
    return target, columns


class _Stats:
    """What the checking pass learns, chunk by chunk."""

    def __init__(
        self,
        path: str,
        fmt: str,
        task: str | None,
        columns: tuple[str, ...],
        origin: str | None = None,
    ) -> None:
        self.path, self.fmt, self.task, self.columns = path, fmt, task, columns
        self.origin = origin  # where a task not inferred came from ("given", ...)
        self.n = 0
        self.width: int | None = None
        self.y_shape: tuple[int, ...] | None = None
        self.integer_typed = True
        self.first_fraction: int | None = None  # first row with a non-integer target
        self.fraction = 0.0  # its value
        self.lo: tuple[float, int] | None = None
        self.hi: tuple[float, int] | None = None
        self.non_binary: int | None = None  # first row with a target other than 0/1

    def where(self, row: int, what: str) -> str:
        if self.fmt == "csv":
            return f"{self.path} line {_csv_line(self.path, row)}: {what}"
        return f"{self.path} row {row}: {what}"

    def add(self, first: int, x: np.ndarray, y: np.ndarray) -> None:
        if self.width is None:
            self.width, self.y_shape = x.shape[1], y.shape[1:]
        if x.dtype.kind == "f":
            bad = ~np.isfinite(x)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                col = f"column {self.columns[c]!r}" if self.columns else f"feature {c}"
                raise DataFileError(self.where(first + int(r), f"NaN or Inf in {col}"))
        if y.dtype.kind == "b":
            y = y.astype(np.int64)
        yf = y.reshape(len(y), -1).astype(np.float64)
        bad = ~np.isfinite(yf).all(axis=1)
        if bad.any():
            raise DataFileError(self.where(first + int(np.argmax(bad)), "NaN or Inf in the target"))
        if y.dtype.kind not in "iu":
            self.integer_typed = False
            frac = (yf != np.round(yf)).any(axis=1)
            if frac.any() and self.first_fraction is None:
                self.first_fraction = first + int(np.argmax(frac))
                self.fraction = float(yf[int(np.argmax(frac)), 0])
        if len(yf):
            col0 = yf[:, 0]
            a, b = int(col0.argmin()), int(col0.argmax())
            if self.lo is None or col0[a] < self.lo[0]:
                self.lo = (float(col0[a]), first + a)
            if self.hi is None or col0[b] > self.hi[0]:
                self.hi = (float(col0[b]), first + b)
            other = ((yf != 0) & (yf != 1)).any(axis=1)
            if other.any() and self.non_binary is None:
                self.non_binary = first + int(np.argmax(other))
        self.n += len(x)

    def finish(self, target: str, columns: tuple[str, ...], arrays: tuple) -> FileData:
        if self.n == 0 or self.lo is None or self.hi is None:
            raise DataFileError(f"{self.path}: no examples (the file has no data rows)")
        single = self.y_shape in ((), (1,))
        task = self.task
        lo, hi = self.lo[0], self.hi[0]
        if task is not None:
            reason = self.origin or "given"
        elif not single:
            task, reason = REGRESS, f"the targets have shape {self.y_shape}, several per example"
        elif self.first_fraction is not None:
            what = self.where(self.first_fraction, f"{self.fraction:g}").split(": ", 1)[0]
            task, reason = REGRESS, f"label {self.fraction:g} ({what}) is not a whole number"
        elif lo < 0:
            task, reason = REGRESS, f"label {lo:g} is negative"
        elif hi >= MAX_INFERRED_CLASSES:
            task, reason = REGRESS, f"label {hi:g} is {MAX_INFERRED_CLASSES} or more"
        else:
            # The value decides, not how it is written: labels 0.0/1.0 are classes as 0/1 are.
            task, reason = CLASSIFY, f"the labels are whole numbers from {lo:g} to {hi:g}"
        if task == CLASSIFY:
            if not single:
                raise DataFileError(
                    f"{self.path}: classify needs one label per example, the targets have "
                    f"shape {self.y_shape}"
                )
            if self.first_fraction is not None:
                raise DataFileError(
                    self.where(self.first_fraction, "label is not an integer (task classify)")
                )
            if self.lo[0] < 0:
                raise DataFileError(self.where(self.lo[1], "negative label (task classify)"))
            outputs = int(self.hi[0]) + 1
            if outputs > MAX_INFERRED_CLASSES and outputs > self.n:
                # an output layer far wider than the data: 1,000,001 classes for 300 rows took
                # 107 s and 6.7 GB before the first step
                raise DataFileError(
                    self.where(
                        self.hi[1],
                        f"label {int(self.hi[0])} implies {outputs:,} classes for {self.n:,} "
                        "examples; number the classes 0..K-1",
                    )
                )
            probe = {0, min(1, self.n - 1), self.lo[1], self.hi[1]}
        else:
            outputs = math.prod(self.y_shape or (1,))
            probe = {0, min(1, self.n - 1)}
            if self.non_binary is not None:
                probe.add(self.non_binary)
        return FileData(
            path=self.path,
            format=self.fmt,
            target=target,
            task=task,
            task_reason=reason,
            length=self.n,
            width=int(self.width or 0),
            outputs=outputs,
            columns=columns,
            probe_rows=tuple(sorted(probe)),
            arrays=arrays,
        )


def _csv_line(path: str, row: int) -> int:
    """The line on which data record ``row`` (from 0) starts: records may span lines (a quoted
    field holding a newline). Slow, so only for error messages."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader, None)
        for _ in range(row):
            if next(reader, None) is None:
                break
        return reader.line_num + 1


# ------------------------------------------------------------------------------ for train()


def task_of_loss(loss: Any) -> str | None:
    """The task a built-in loss implies (a custom callable: inferred from the file)."""
    return {"cross_entropy": CLASSIFY, "mse": REGRESS}.get(loss) if isinstance(loss, str) else None


def as_file_data(
    data: Any, name: str, dtype: torch.dtype, loss: Any, like: FileData | None = None
) -> FileData | None:
    """``train_data``/``eval_data`` as a :class:`FileData` if it is a path or one (checked,
    read as ``dtype``), else None. ``like``: the training data, whose width this must have."""
    if isinstance(data, (str, os.PathLike)):
        if os.path.splitext(os.fspath(data))[1].lower() not in FORMATS:
            return None  # not a data file's name: refused as not data at all
        try:
            data = scan(data, task=task_of_loss(loss), like=like)
        except DataFileError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if not isinstance(data, FileData):
        return None
    if like is not None and data.columns and like.columns and data.columns != like.columns:
        try:
            columns = _match_columns(data.path, data.columns, like)
        except DataFileError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        data = replace(data, columns=columns, _reader=None)
    if like is not None and data.width != like.width:
        raise ConfigError(
            f"{name}: {data.path} has {data.width} features per example but the training data "
            f"({like.path}) has {like.width}"
        )
    return data.with_dtype(dtype)
