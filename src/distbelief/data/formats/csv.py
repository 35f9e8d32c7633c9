"""CSV: a header row of column names, then one example a record."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator

import numpy as np

from .base import Chunk, DataFileError, Format, Layout, Span
from .columns import pick_target


class CsvFormat(Format):
    """A ``.csv`` file: the target is a column (default: the last), every other column a
    feature; a message names the line a record starts on."""

    name, suffix, target_is_path = "csv", ".csv", False

    def layout(self, path: str, target: str | None) -> Layout:
        """The header row's columns."""
        try:
            # utf-8-sig: spreadsheets write "CSV UTF-8" with a byte-order mark, not part of a name
            with open(path, newline="", encoding="utf-8-sig") as f:
                header = next(csv.reader(f), None)
        except UnicodeDecodeError:
            raise DataFileError(f"{path} line 1: not text (is it really a CSV file?)") from None
        if not header or not any(h.strip() for h in header):
            raise DataFileError(f"{path}: the file is empty (no header row)")
        return pick_target(path, list(header), target)

    def chunks(self, path: str, layout: Layout, span: Span | None = None) -> Iterator[Chunk]:
        """Blocks parsed by Arrow; on a bad cell, the slow exact search names its line."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pcsv

        target, columns = layout.target, layout.columns
        types = {c: pa.float64() for c in columns}
        types[target] = pa.string()  # cast below: integers (labels) or floats (regression)
        first = 0
        try:
            reader = pcsv.open_csv(
                path,
                read_options=pcsv.ReadOptions(block_size=1 << 20),
                convert_options=pcsv.ConvertOptions(
                    null_values=[""],  # only an empty cell is missing; "nan" is a NaN, refused
                    column_types=types,
                    include_columns=[*columns, target],
                ),
            )
            for batch in reader:
                if any(batch.column(c).null_count for c in columns):
                    raise pa.ArrowInvalid("an empty cell")
                x = (
                    np.column_stack(
                        [batch.column(c).to_numpy(zero_copy_only=False) for c in columns]
                    )
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
            where = _locate(path)
            raise DataFileError(where or f"{path}: {str(exc).splitlines()[0]}") from None

    def where(self, path: str, row: int) -> str:
        """The line on which data record ``row`` (from 0) starts: records may span lines (a
        quoted field holding a newline). Slow, so only for error messages."""
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            next(reader, None)
            for _ in range(row):
                if next(reader, None) is None:
                    break
            return f"{path} line {reader.line_num + 1}"


def _locate(path: str) -> str | None:
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


FORMAT = CsvFormat()
