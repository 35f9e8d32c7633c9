"""``.npy`` pairs: the inputs in ``x.npy`` (or ``*x.npy``), the labels in ``y.npy`` beside it."""

from __future__ import annotations

import os
from collections.abc import Iterator

from .arrays import ArrayFile, array_chunks, array_file, paired
from .base import Chunk, DataFileError, Format, Layout


class NpyFormat(Format):
    """A ``.npy`` file of inputs and another of labels; rows of both are read by position."""

    name, suffix, target_is_path = "npy", ".npy", True

    def layout(self, path: str, target: str | None) -> Layout:
        """Both arrays, with as many rows; the target is the labels' file (absolute)."""
        target = os.path.abspath(target) if target else _labels(path)
        return paired(path, *self._arrays(path, target), target)

    def chunks(
        self,
        path: str,
        target: str,
        columns: tuple[str, ...],
        span: tuple[int, int] | None = None,
    ) -> Iterator[Chunk]:
        """All rows, from the start."""
        yield from array_chunks(*self._arrays(path, target))

    def _arrays(self, path: str, target: str) -> tuple[ArrayFile, ArrayFile]:
        if not os.path.exists(target):
            raise DataFileError(f"{target}: no such file (the labels for {path})")
        return array_file(path, 0, path), array_file(target, 0, target)


def _labels(path: str) -> str:
    """``x.npy`` -> ``y.npy``; ``train_x.npy`` -> ``train_y.npy``."""
    head, name = os.path.split(path)
    stem = name[: -len(".npy")]
    if not stem.endswith("x"):
        raise DataFileError(
            f"{path}: name the inputs x.npy (or *x.npy) and the labels y.npy beside it, "
            "or give the labels' file as the target"
        )
    return os.path.join(head, stem[:-1] + "y.npy")


FORMAT = NpyFormat()
