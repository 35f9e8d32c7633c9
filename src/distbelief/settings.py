"""Settings: what every algorithm's configuration shares (the seed bound, checks of numbers
and of checkpoint fields)."""

from __future__ import annotations

import numbers
import os
from typing import Any

import numpy as np

from .errors import ConfigError

MAX_SEED = 2**63 - 1
"""torch.manual_seed takes seeds up to 2**64 - 1; numpy's SeedSequence any; the bound is the
smaller signed one, so a seed also fits every int64 field it is recorded in."""


def _is_int(v: object) -> bool:
    # numbers.Integral admits numpy's integer scalars (np.int64(32)); bools are not counts.
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _check_checkpoints(config: Any) -> None:
    """The checkpoint fields both configurations share: absolute paths, a period >= 0."""
    for name in ("checkpoint_dir", "resume"):  # absolute: a Ray actor has another cwd
        v = getattr(config, name)
        if v is not None:
            if not isinstance(v, (str, os.PathLike)) or not str(v):
                raise ConfigError(f"{name}: expected a directory path, got {_show(v)}")
            object.__setattr__(config, name, os.path.abspath(v))
    if not _is_int(config.checkpoint_every) or config.checkpoint_every < 0:
        raise ConfigError(
            f"checkpoint_every: must be an integer >= 0, got {_show(config.checkpoint_every)}"
        )
    object.__setattr__(config, "checkpoint_every", int(config.checkpoint_every))
    if config.checkpoint_every and config.checkpoint_dir is None:
        raise ConfigError("checkpoint_every: checkpoints need a checkpoint_dir")


def _show(v: object) -> str:
    """A value as the user typed it: numpy scalars without their ``np.int64(...)`` wrapper."""
    return repr(v.item()) if isinstance(v, np.generic) else repr(v)
