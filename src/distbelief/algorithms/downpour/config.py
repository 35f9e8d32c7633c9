"""Downpour SGD's configuration: one frozen dataclass per run, validated on construction with
errors that name the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...core.optim import UPDATE_RULES
from ...errors import ConfigError
from ...runtime import RUNTIMES
from ...settings import MAX_SEED, _check_checkpoints, _is_int, _is_real, _show


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
