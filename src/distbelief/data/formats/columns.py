"""Named columns (CSV, Parquet): which one is the target, and a test file's columns matched by
name against the training file's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import DataFileError, Layout

if TYPE_CHECKING:
    from .filedata import FileData


def pick_target(path: str, names: list[str], target: str | None) -> Layout:
    """The target column (default: the last) and the feature columns, in the file's order;
    refuses a name given twice, a target the file lacks, or no feature left."""
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
    return Layout(target, columns)


def match_columns(path: str, columns: tuple[str, ...], like: FileData) -> tuple[str, ...]:
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
