"""``.npz``: an archive of arrays, the inputs ``x`` and the targets (default ``y``)."""

from __future__ import annotations

import struct
import zipfile

import numpy as np

from .arrays import ArrayFile, ArrayPair, array_file
from .base import DataFileError


class NpzFormat(ArrayPair):
    """An ``.npz`` file (``np.savez``): rows of an uncompressed member are read by position,
    a compressed one is loaded and streamed."""

    name, suffix, target_is_path = "npz", ".npz", False

    def target_of(self, path: str, target: str | None) -> str:
        """The targets' array: given, or ``y``."""
        return target or "y"

    def arrays(self, path: str, target: str) -> tuple[ArrayFile | np.ndarray, ...]:
        """Members ``x`` and ``target``."""
        return _member(path, "x"), _member(path, target)


def _member(path: str, name: str) -> ArrayFile | np.ndarray:
    """An ``.npz`` member: read in place if stored uncompressed, else loaded."""
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
        return array_file(path, info.header_offset + 30 + name_len + extra_len,
                          f"{path} array {name!r}")  # fmt: skip
    except zipfile.BadZipFile:
        raise DataFileError(f"{path}: not an .npz file (not a zip archive)") from None
    except ValueError as exc:
        raise DataFileError(f"{path} array {name!r}: {exc}") from None


FORMAT = NpzFormat()
