"""Parquet: named, typed columns in row groups."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .base import SCAN_ROWS, Chunk, DataFileError, Format, Layout, Span
from .columns import pick_target


class ParquetFormat(Format):
    """A ``.parquet`` file: the target is a column (default: the last), every other column a
    feature, all numeric; a part reads only the row groups that hold its rows."""

    name, suffix, target_is_path = "parquet", ".parquet", False

    def layout(self, path: str, target: str | None) -> Layout:
        """The schema's columns, each checked to be numeric."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.ParquetFile(path).schema_arrow
        except (pa.ArrowInvalid, pa.ArrowException) as exc:
            raise DataFileError(f"{path}: not a Parquet file ({exc})") from None
        layout = pick_target(path, list(schema.names), target)
        for name in (*layout.columns, layout.target):
            t = schema.field(name).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                raise DataFileError(f"{path}, column {name!r}: type {t} is not numeric")
        return layout

    def chunks(self, path: str, layout: Layout, span: Span | None = None) -> Iterator[Chunk]:
        """Batches of the row groups that overlap ``span`` (file rows ``lo:hi``; None: all)."""
        import pyarrow.parquet as pq

        target, columns = layout.target, layout.columns
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
                    nulls = col.is_null().to_numpy(zero_copy_only=False)
                    row = first + int(np.flatnonzero(nulls)[0])
                    raise DataFileError(f"{path} row {row}, column {name!r}: missing value (null)")
            x = (
                np.column_stack(
                    [
                        batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                        for c in columns
                    ]
                )
                if columns
                else np.empty((batch.num_rows, 0))
            )
            y = batch.column(target).to_numpy(zero_copy_only=False)
            yield first, x, y
            first += batch.num_rows


FORMAT = ParquetFormat()
