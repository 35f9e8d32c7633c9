"""The bundled datasets. Nothing is downloaded: data is generated or ships inside an installed
package."""

from __future__ import annotations

import numpy as np
import torch

from .tensors import Data


def mnist1d(num_samples: int = 10000, seed: int = 42) -> tuple[Data, Data]:
    """MNIST-1D generated locally by the ``mnist1d`` package (``make_dataset``, no download).

    Returns ``((X_train, y_train), (X_test, y_test))``; inputs are float32 of length 40.
    """
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
    to_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    to_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return (to_x(d["x"]), to_y(d["y"])), (to_x(d["x_test"]), to_y(d["y_test"]))


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
