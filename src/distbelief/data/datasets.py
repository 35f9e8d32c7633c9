"""The bundled datasets. Nothing is downloaded: data is generated or ships inside an installed
package."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .tensors import Data

CACHE_ENV = "DISTBELIEF_CACHE_DIR"
"""Environment variable naming the directory of generated datasets; set to an empty string, no
dataset is cached."""

_MNIST1D_ARRAYS = ("x", "y", "x_test", "y_test")

MAKING_WAIT_S = 120.0
"""How long a process waits for another that is making the same dataset (:func:`_making`)
before it makes its own."""


def cache_dir() -> Path | None:
    """Where generated datasets are kept: ``$DISTBELIEF_CACHE_DIR`` if set (empty: nowhere),
    else ``$XDG_CACHE_HOME/distbelief``, else ``~/.cache/distbelief``."""
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV]) if os.environ[CACHE_ENV] else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distbelief"


def mnist1d(num_samples: int = 10000, seed: int = 42) -> tuple[Data, Data]:
    """MNIST-1D generated locally by the ``mnist1d`` package (``make_dataset``, no download).

    Returns ``((X_train, y_train), (X_test, y_test))``; inputs are float32 of length 40.
    Generating it takes seconds, so the arrays are kept in :func:`cache_dir` (one ``.npz``
    per size, seed and ``mnist1d`` version, written whole or not at all) and read from there
    afterwards; a cache file that cannot be read is made again, and a cache that cannot be
    written is skipped. Processes of one machine that ask at once (a run's data shards, a test
    suite's workers) make it once: the others wait for it and read it.
    """
    name = _mnist1d_file(num_samples, seed)
    where = cache_dir()
    arrays = _read_cached(where / name) if where is not None else None
    if arrays is None and where is not None:
        with _making(where / name):
            arrays = _read_cached(where / name)  # made by the process that held the lock
            if arrays is None:
                arrays = _make_mnist1d(num_samples, seed)
                _write_cached(where / name, arrays)
    elif arrays is None:
        arrays = _make_mnist1d(num_samples, seed)
    to_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    to_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    x, y, x_test, y_test = (arrays[k] for k in _MNIST1D_ARRAYS)
    return (to_x(x), to_y(y)), (to_x(x_test), to_y(y_test))


def _mnist1d_file(num_samples: int, seed: int) -> str:
    """The cache file's name: one per size, seed and ``mnist1d`` version."""
    from importlib.metadata import version

    return f"mnist1d-{version('mnist1d')}-{num_samples}-{seed}.npz"


def _make_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset reseeds the global numpy/random generators; keep the caller's state.
    import random

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(d[k]) for k in _MNIST1D_ARRAYS}


@contextlib.contextmanager
def _making(path: Path) -> Iterator[None]:
    """Held while the dataset cached at ``path`` is made: a lock on ``<path>.lock``
    (``flock``: the kernel lets it go when its holder dies, however it dies). A process that
    finds it held waits up to :data:`MAKING_WAIT_S` (polling), then goes on without it; a
    cache where no lock can be had (read-only, no ``flock``) is not waited on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + MAKING_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # another process is making it
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
            except OSError:
                break
        yield
    finally:
        os.close(fd)  # lets the lock go


def _read_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None if it is missing or not a whole one."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _MNIST1D_ARRAYS}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    whole = (
        arrays["x"].ndim == 2
        and arrays["x_test"].ndim == 2
        and len(arrays["x"]) == len(arrays["y"])
        and len(arrays["x_test"]) == len(arrays["y_test"])
    )
    return arrays if whole else None


def _write_cached(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (a temporary file renamed), so a reader never sees half a file; any
    failure (read-only or full disk) leaves the cache as it was."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


XOR_TABLE = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_TARGETS = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


def xor(num_samples: int = 50000, seed: int = 0) -> tuple[Data, Data]:
    """The seed's XOR example: random rows of the XOR truth table; the test set is the table."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 4, (num_samples,), generator=g)
    return (XOR_TABLE[idx], XOR_TARGETS[idx]), (XOR_TABLE.clone(), XOR_TARGETS.clone())


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Data, Data]:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])
