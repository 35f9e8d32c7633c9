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

The modules: ``base`` (errors, the :class:`Format` protocol and the registry by suffix),
``checking`` (the checking pass, the task), ``filedata`` (a view of rows and reading it),
``arrays`` and ``columns`` (what several formats share), then one module per format. A new
format is a module whose ``FORMAT`` implements :class:`Format`, and a line below.
"""

from __future__ import annotations

from . import csv, npy, npz, parquet
from .base import (
    CLASSIFY,
    REGRESS,
    TASKS,
    DataFileChanged,
    DataFileError,
    Format,
    Layout,
    format_of,
    register,
    suffixes,
)
from .checking import as_file_data, files, scan, task_of_loss
from .filedata import FileData

# The formats, in the order messages list them.
register(csv.FORMAT)
register(parquet.FORMAT)
register(npz.FORMAT)
register(npy.FORMAT)

__all__ = [
    "CLASSIFY",
    "REGRESS",
    "TASKS",
    "DataFileChanged",
    "DataFileError",
    "FileData",
    "Format",
    "Layout",
    "as_file_data",
    "files",
    "format_of",
    "register",
    "scan",
    "suffixes",
    "task_of_loss",
]
