"""Sandblaster L-BFGS's configuration: one frozen dataclass per run, validated on construction
with errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigError
from ...runtime import RUNTIMES
from ...settings import _check_checkpoints, _is_int


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
