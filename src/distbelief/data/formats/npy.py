"""``.npy`` pairs: the inputs in ``x.npy`` (or ``*x.npy``), the labels in ``y.npy`` beside it."""

from __future__ import annotations

import os

from .arrays import ArrayFile, ArrayPair, array_file
from .base import DataFileError


class NpyFormat(ArrayPair):
    """A ``.npy`` file of inputs and another of labels; rows of both are read by position."""

    name, suffix, target_is_path = "npy", ".npy", True

    def target_of(self, path: str, target: str | None) -> str:
        """The labels' file (absolute): given, or ``y.npy`` beside ``x.npy``."""
        if target:
            return os.path.abspath(target)
        head, name = os.path.split(path)
        stem = name[: -len(".npy")]
        if not stem.endswith("x"):
            raise DataFileError(
                f"{path}: name the inputs x.npy (or *x.npy) and the labels y.npy beside it, "
                "or give the labels' file as the target"
            )
        return os.path.join(head, stem[:-1] + "y.npy")  # train_x.npy -> train_y.npy

    def arrays(self, path: str, target: str) -> tuple[ArrayFile, ArrayFile]:
        """Both files' arrays."""
        if not os.path.exists(target):
            raise DataFileError(f"{target}: no such file (the labels for {path})")
        return array_file(path, 0, path), array_file(target, 0, target)


FORMAT = NpyFormat()
