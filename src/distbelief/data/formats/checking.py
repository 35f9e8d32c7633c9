"""The checking pass: a data file's format found by its suffix, its layout read, every row
checked in one streaming pass (chunks, never the whole file in memory), the task decided, and a
:class:`FileData` made."""

from __future__ import annotations

import errno
import math
import os
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from .base import (
    CLASSIFY,
    MAX_INFERRED_CLASSES,
    REGRESS,
    TASKS,
    DataFileError,
    Format,
    format_of,
    named,
    suffixes,
)
from .columns import match_columns
from .filedata import FileData


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
    fmt = format_of(path)
    origin = "given" if task is not None else None
    if like is not None:
        origin = origin or f"as the training data ({os.path.basename(like.path)})"
        task = task or like.task
        # a .npy's labels are found beside it, so neither takes nor gives a target
        labels_beside = named(like.format).target_is_path or (fmt and fmt.target_is_path)
        if target is None and not labels_beside:
            target = like.target
    if task is not None and task not in TASKS:
        raise DataFileError(f"task must be {' or '.join(TASKS)}, got {task!r}")
    if fmt is None and not os.path.isdir(path):
        ext = os.path.splitext(path)[1].lower()
        raise DataFileError(
            f"{path}: unknown format {ext or '(no extension)'!r}; use {', '.join(suffixes())}"
        )
    _check_file(path)
    assert fmt is not None  # a directory, whatever its name, was refused above
    try:
        layout = fmt.layout(path, target)
        columns = layout.columns
        if columns and like is not None and like.columns:
            columns = match_columns(path, columns, like)
        stats = _Stats(path, fmt, task, columns, origin)
        for first, x, y in fmt.chunks(path, replace(layout, columns=columns)):
            stats.add(first, x, y)
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return stats.finish(layout.target, columns, layout.arrays)


def _check_file(path: str) -> None:
    """Refuse a path that is not a readable, non-empty file, saying what it is instead."""
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


class _Stats:
    """What the checking pass learns, chunk by chunk."""

    def __init__(
        self,
        path: str,
        fmt: Format,
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
        return f"{self.fmt.where(self.path, row)}: {what}"

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
            format=self.fmt.name,
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
        if format_of(os.fspath(data)) is None:
            return None  # not a data file's name: refused as not data at all
        try:
            data = scan(data, task=task_of_loss(loss), like=like)
        except DataFileError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if not isinstance(data, FileData):
        return None
    if like is not None and data.columns and like.columns and data.columns != like.columns:
        try:
            columns = match_columns(data.path, data.columns, like)
        except DataFileError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        data = replace(data, columns=columns, _reader=None)
    if like is not None and data.width != like.width:
        raise ConfigError(
            f"{name}: {data.path} has {data.width} features per example but the training data "
            f"({like.path}) has {like.width}"
        )
    return data.with_dtype(dtype)
