"""What every data format shares: the errors, the tasks, the sizes of a read, and the small
protocol a format implements, with the registry that finds a format by its file's suffix."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

CLASSIFY, REGRESS = "classify", "regress"
TASKS = (CLASSIFY, REGRESS)
MAX_INFERRED_CLASSES = 1000
"""Whole-number targets in 0..999 (``1`` or ``1.0``) are inferred to be class labels; anything
else is regression."""
SCAN_ROWS = 65536
"""Rows per chunk of the checking pass and of a data shard's streaming read."""
CHUNK_BYTES = 8 << 20
"""At most this much of an array file is read at a time by the checking pass."""


class DataFileError(Exception):
    """A data file that cannot be used; the message names the file and where."""


class DataFileChanged(DataFileError):
    """A data file changed or shrank after it was checked (found while training)."""


Chunk = tuple[int, np.ndarray, np.ndarray]
"""``(first file row, inputs (rows, features), targets)``: consecutive rows of a file."""
Span = tuple[int, int]
"""File rows ``lo:hi``."""


@dataclass(frozen=True)
class Layout:
    """What a format finds in a file before reading its rows."""

    target: str
    """The target as the format names it (a column, an array, the labels' file)."""
    columns: tuple[str, ...] = ()
    """Feature columns, in order, for formats whose columns have names (else ())."""
    arrays: tuple[Any, ...] = ()
    """Where inputs and targets are stored raw (two ``ArrayFile``), if rows can be read by
    position; () if the file must be streamed to reach a row."""


class Format(Protocol):
    """A data file format. The rest is common to every format: the checking pass and the task
    (``checking``), a replica's part of the rows and reading it (``FileData``)."""

    name: str
    """``FileData.format``: ``csv``, ``parquet``, ..."""
    suffix: str
    """The file name's suffix, lower case with its dot: the registry's key."""
    target_is_path: bool
    """The target names a file of its own (the labels'), so a test file does not take the
    training file's."""

    def layout(self, path: str, target: str | None) -> Layout:
        """The target (the format's default for None), the feature columns and, where the
        format stores rows at known offsets, the arrays; refuses a file it cannot read."""
        ...

    def chunks(self, path: str, layout: Layout, span: Span | None = None) -> Iterator[Chunk]:
        """The file's rows in order, a chunk at a time: ``layout``'s columns (in its order)
        and target. ``span`` is a hint that only those rows are wanted (a format may skip
        what lies outside)."""
        ...

    def where(self, path: str, row: int) -> str:
        """How a message names data row ``row`` (from 0): ``"<path> row 7"`` unless the
        format says otherwise (CSV: the line)."""
        return f"{path} row {row}"


_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
    """Make ``fmt`` the format of files ending in ``fmt.suffix``."""
    _FORMATS[fmt.suffix] = fmt


def suffixes() -> tuple[str, ...]:
    """The suffixes of the registered formats, in the order they were registered."""
    return tuple(_FORMATS)


def format_of(path: str) -> Format | None:
    """The format a file name's suffix (any case) says, or None."""
    return _FORMATS.get(os.path.splitext(path)[1].lower())


def named(name: str) -> Format:
    """The format ``FileData.format`` names."""
    return next(fmt for fmt in _FORMATS.values() if fmt.name == name)
