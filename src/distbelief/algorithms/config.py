"""One frozen dataclass per run, validated on construction with errors that name the field."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.optim import UPDATE_RULES
from ..errors import ConfigError
from ..runtime import RUNTIMES

MAX_SEED = 2**63 - 1
"""torch.manual_seed takes seeds up to 2**64 - 1; numpy's SeedSequence any; the bound is the
smaller signed one, so a seed also fits every int64 field it is recorded in."""


def _is_int(v: object) -> bool:
    # numbers.Integral admits numpy's integer scalars (np.int64(32)); bools are not counts.
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class DownpourConfig:
    """Everything that shapes a Downpour SGD run besides the model and the data."""

    lr: float
    """Learning rate of the shards' update rule (Adagrad's gamma)."""
    batch_size: int
    """Examples per mini-batch, per replica."""
    epochs: int
    """Passes of each replica over its own data shard."""
    stages: int | tuple[int, ...] = 1
    """Partitions per replica: a count (balanced by parameter count) or split points."""
    replicas: int = 1
    """Model replicas, each on its own part of the training data."""
    shards: int = 1
    """Parameter-server shards the flat parameter vector is split over."""
    optimizer: str = "sgd"
    """Update rule applied at the shards: sgd, momentum, adagrad or adam."""
    n_fetch: int = 1
    """A stage fetches its parameters every n_fetch steps (the paper's n_fetch)."""
    n_push: int = 1
    """A stage pushes its accrued gradient every n_push steps (the paper's n_push)."""
    warmstart_steps: int = 0
    """Steps replica 0 trains alone before the others start (0: all start together)."""
    local_lr: float = 0.0
    """Rate of the paper's optional client-side step w <- w - local_lr*g between fetches
    (0: off, so a replica's copy changes only when it fetches)."""
    seed: int | None = None
    """Seeds data order, actor interleaving and torch's RNG; None draws one (see result)."""
    runtime: str = "local"
    """Where actors run: 'local' (in-process, one core, default), 'processes' (forked
    worker processes over shared memory: one machine's cores) or 'ray' (a cluster)."""
    runtime_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the runtime (e.g. Ray's address)."""
    eval_every: int = 0
    """Evaluate on eval data every this many training examples (0: only at the end)."""
    timeout_s: float = 3600.0
    """Longest a run may take before it is stopped with an error naming the wait."""
    checkpoint_dir: str | None = None
    """Write checkpoints here (``ckpt-<update>`` directories; the newest whole one is kept):
    every ``checkpoint_every`` steps and at the end. A shard the runtime restarts is restored
    from the newest one where it is newer than every replica's copy. None: no checkpoints."""
    checkpoint_every: int = 0
    """Steps (mini-batches over all replicas) between checkpoints; 0: only at the end
    (``distbelief.train`` makes it one epoch's steps unless told otherwise). Steps,
    not updates: they do not depend on n_push, stages or shards. Taken at the first replica
    progress report past each multiple (reports come every <= 50 steps of a replica)."""
    resume: str | None = None
    """A checkpoint (``ckpt-<update>``) or a directory of them (the newest is taken) to carry
    on from: parameters, update rules' state, versions and each replica's data position."""

    def __post_init__(self) -> None:
        _check_checkpoints(self)
        for name in ("batch_size", "epochs", "replicas", "shards", "n_fetch", "n_push"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {_show(v)}")
            object.__setattr__(self, name, int(v))  # numpy scalars become plain ints
        for name in ("warmstart_steps", "eval_every"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ConfigError(f"{name}: must be an integer >= 0, got {_show(v)}")
            object.__setattr__(self, name, int(v))
        for name, positive in (("lr", True), ("local_lr", False), ("timeout_s", True)):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or v < 0 or (positive and v == 0):
                bound = "> 0" if positive else ">= 0"
                raise ConfigError(f"{name}: must be a finite number {bound}, got {_show(v)}")
            object.__setattr__(self, name, float(v))
        if self.optimizer not in UPDATE_RULES:
            raise ConfigError(
                f"optimizer: unknown optimizer {self.optimizer!r}; "
                f"choose one of {', '.join(UPDATE_RULES)}"
            )
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"runtime: unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}"
            )
        if self.seed is not None:
            if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
                raise ConfigError(
                    f"seed: must be an integer from 0 to 2**63 - 1 or None, got {_show(self.seed)}"
                )
            object.__setattr__(self, "seed", int(self.seed))
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        if not (_is_int(self.stages) or isinstance(self.stages, tuple)):
            raise ConfigError(f"stages: expected a count or split points, got {self.stages!r}")
        if _is_int(self.stages) and self.stages < 1:
            raise ConfigError(f"stages: must be >= 1, got {self.stages}")


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


@dataclass(frozen=True)
class SandblasterConfig:
    """Everything that shapes a Sandblaster L-BFGS run besides the model and the data."""

    steps: int = 100
    """Most L-BFGS iterations (it may stop earlier: gradient or loss change below tolerance)."""
    history: int = 10
    """Pairs (s, y) of the L-BFGS history, the m of L-BFGS (torch.optim.LBFGS's default)."""
    portions: int | None = None
    """Portions each batch is cut into; None: 8 per replica (far more than replicas, so a fast
    replica does more and backup tasks have something to back up)."""
    batch_size: int | None = None
    """Examples per L-BFGS step: None for the whole training set; a number for a fresh batch
    of that size at every step (mini-batch L-BFGS)."""
    replicas: int = 1
    """Model replicas computing portions."""
    shards: int = 1
    """Parameter shards holding the slices of every vector."""
    push_every: int = 4
    """A replica pushes its accrued gradient sum every this many accepted portions (and at the
    end of each evaluation): fewer, larger pushes, and little lost if it dies."""
    seed: int | None = None
    """Seeds mini-batch order, actor interleaving and torch's RNG; None draws one."""
    runtime: str = "local"
    """Where actors run: 'local' (in-process, default) or 'ray'."""
    runtime_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the runtime, and Sandblaster's own: ``slow_replicas``
    ({replica: factor}), ``backup_tasks`` (bool), ``duplicate_portions`` (bool),
    ``eval_steps`` (bool); see ``sandblaster.OPTIONS``."""
    timeout_s: float = 3600.0
    """Longest a run may take before it is stopped with an error naming the wait."""
    checkpoint_dir: str | None = None
    """Write checkpoints here (as Downpour's: ``ckpt-<step>``, the newest kept): the
    coordinator's state and every shard's slice of every vector, every ``checkpoint_every``
    steps and after the last. None: no checkpoints."""
    checkpoint_every: int = 0
    """L-BFGS steps between checkpoints; 0: only after the last step."""
    resume: str | None = None
    """A checkpoint (or a directory of them, the newest taken) to carry on from."""

    def __post_init__(self) -> None:
        _check_checkpoints(self)
        for name in ("steps", "history", "replicas", "shards", "push_every"):
            v = getattr(self, name)
            low = 0 if name == "steps" else 1
            if not _is_int(v) or v < low:
                raise ConfigError(f"{name}: must be an integer >= {low}, got {v!r}")
        for name in ("portions", "batch_size"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(f"{name}: must be an integer >= 1 or None, got {v!r}")
        if self.portions is not None and self.portions < self.replicas:
            raise ConfigError(
                f"portions: {self.portions} portions for {self.replicas} replicas; give at "
                "least one per replica"
            )
        t = self.timeout_s
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
            raise ConfigError(f"timeout_s: must be a finite number > 0, got {t!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"runtime: unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}"
            )
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ConfigError(f"seed: must be an integer >= 0 or None, got {self.seed!r}")

    @property
    def portion_count(self) -> int:
        """Portions per batch (the default resolved)."""
        return self.portions if self.portions is not None else 8 * self.replicas
