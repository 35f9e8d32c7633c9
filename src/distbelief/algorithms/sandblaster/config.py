"""Sandblaster L-BFGS's configuration: one frozen dataclass per run, each field a setting
declared once (default, check, flag help, policies; see ``distbelief.settings``), validated on
construction with errors that name the field. Its presets and its summary are declared here
too, for the command."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import ConfigError
from ...settings import (
    CHECKPOINT_DIR,
    CHECKPOINT_EVERY,
    REPLICAS,
    RESUME,
    RUNTIME,
    RUNTIME_OPTIONS,
    SEED,
    SHARDS,
    TIMEOUT_S,
    Summary,
    check_checkpoints,
    integer,
    setting,
    stage_split,
    validate,
)

OWNER = "sandblaster"


@dataclass(frozen=True)
class SandblasterConfig:
    """Everything that shapes a Sandblaster L-BFGS run besides the model and the data."""

    steps: int = setting(
        100, owner=OWNER, check=integer(0), kind=int, preset=True, shown="steps_max",
        may_differ=True, help="Sandblaster: most L-BFGS steps (preset: 60).",
    )  # fmt: skip
    """Most L-BFGS iterations (it may stop earlier: gradient or loss change below tolerance)."""
    history: int = setting(
        10, owner=OWNER, check=integer(1), kind=int, preset=True, shown=True, must_agree=True,
        help="Sandblaster: L-BFGS history pairs (10).",
    )  # fmt: skip
    """Pairs (s, y) of the L-BFGS history, the m of L-BFGS (torch.optim.LBFGS's default)."""
    portions: int | None = setting(
        None, owner=OWNER, check=integer(1, optional=True), kind=int,
        help="Sandblaster: portions per batch (8 per replica).",
    )  # fmt: skip
    """Portions each batch is cut into; None: 8 per replica (far more than replicas, so a fast
    replica does more and backup tasks have something to back up)."""
    batch_size: int | None = setting(
        None, owner=OWNER, check=integer(1, optional=True), kind=int, preset=True, shown=True,
        must_agree=True,
    )  # fmt: skip
    """Examples per L-BFGS step: None for the whole training set; a number for a fresh batch
    of that size at every step (mini-batch L-BFGS). (Its flag is Downpour's --batch-size.)"""
    stages: int | tuple[int, ...] = setting(
        1, owner=OWNER, check=stage_split, kind=int, shown=True, neutral=1,
    )  # fmt: skip
    """Each replica split by layer into this many stages, one group of actors each (a count,
    balanced by parameter count, or split points; 1: the replica is one actor). (Its flag is
    Downpour's --stages.)"""
    partitions: int = setting(
        1, owner=OWNER, check=integer(1), kind=int, shown=True, neutral=1,
    )  # fmt: skip
    """Each stage's layers cut into this many blocks of units, one actor each, as Downpour's
    (see docs/partitions.md). (Its flag is Downpour's --partitions.)"""
    replicas: int = REPLICAS.field()
    """Model replicas computing portions."""
    shards: int = SHARDS.field()
    """Parameter shards holding the slices of every vector."""
    push_every: int = setting(4, owner=OWNER, check=integer(1), flag=False)
    """A replica pushes its accrued gradient sum every this many accepted portions (and at the
    end of each evaluation): fewer, larger pushes, and little lost if it dies."""
    seed: int | None = SEED.field()
    """Seeds mini-batch order, actor interleaving and torch's RNG; None draws one."""
    runtime: str = RUNTIME.field()
    """Where actors run: 'local' (in-process, default), 'processes' or 'ray'."""
    runtime_options: dict[str, Any] = RUNTIME_OPTIONS.field()
    """Extra keyword arguments for the runtime, and Sandblaster's own: ``slow_replicas``
    ({replica: factor}), ``backup_tasks`` (bool), ``duplicate_portions`` (bool),
    ``eval_steps`` (bool); see ``sandblaster.OPTIONS``."""
    timeout_s: float = TIMEOUT_S.field()
    """Longest a run may take before it is stopped with an error naming the wait."""
    checkpoint_dir: str | None = CHECKPOINT_DIR.field()
    """Write checkpoints here (as Downpour's: ``ckpt-<step>``, the newest kept): the
    coordinator's state and every shard's slice of every vector, every ``checkpoint_every``
    steps and after the last. None: no checkpoints."""
    checkpoint_every: int = CHECKPOINT_EVERY.field()
    """L-BFGS steps between checkpoints; 0: only after the last step."""
    resume: str | None = RESUME.field()
    """A checkpoint (or a directory of them, the newest taken) to carry on from."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Full-batch L-BFGS over the 8,000 training examples: 60 steps (~66 evaluations)
        # reached test accuracy 0.65 with seed 0 (a mini-batch of 1,000 per step reached only
        # 0.50 in 40).
        "mnist1d": dict(steps=60, history=10, batch_size=None, replicas=4, shards=2),
        "xor": dict(steps=100, history=10, batch_size=None, replicas=4, shards=2),
        # Also the settings of a --data FILE run.
        "digits": dict(steps=50, history=10, batch_size=None, replicas=4, shards=2),
    }
    """The settings each preset dataset trains well with (the command's defaults)."""
    SUMMARY: ClassVar[Summary]
    """What the command's summary shows of a run beyond its settings (below)."""
    IN_MEMORY: ClassVar[bool] = True
    """Whether its replicas take the training data in memory (the command reads a data file
    whole)."""

    def __post_init__(self) -> None:
        validate(self)
        check_checkpoints(self)
        if self.portions is not None and self.portions < self.replicas:
            raise ConfigError(
                f"portions: {self.portions} portions for {self.replicas} replicas; give at "
                "least one per replica"
            )

    @property
    def portion_count(self) -> int:
        """Portions per batch (the default resolved)."""
        return self.portions if self.portions is not None else 8 * self.replicas


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _model(s: dict[str, Any]) -> str:
    widths = "-".join(str(w) for w in s["hidden"]) or "none"
    shape = s.get("model") or f"MLP, hidden {widths}"
    return f"{shape} ({s['parameters']:,} parameters)"


def _layout(s: dict[str, Any]) -> str:
    stages, parts = s.get("stages", 1), s.get("partitions", 1)
    split = "" if stages == 1 and parts == 1 else f" x {stages} stages x {parts} partitions"
    return f"{s['replicas']}{split}, {s['shards']} ({s['runtime']} runtime)"


def _batch(s: dict[str, Any]) -> str:
    batch = "all" if s["batch_size"] is None else s["batch_size"]
    return f"{batch}, {s['portions']}, {s['history']}"


SUMMARY = Summary(
    report=(
        ("portions", lambda r: r.stats["portions"]),
        ("steps", lambda r: r.stats["steps"]),
        ("function_evals", lambda r: r.stats["function_evals"]),
        ("stop", lambda r: r.stats["stop"]),
        ("examples", lambda r: r.stats["examples"]),
        ("final_loss", lambda r: r.stats["final_loss"]),
        ("portions_done", lambda r: r.stats["portions_done"]),
        ("backup_portions", lambda r: r.stats["backup_portions"]),
        ("backup_wins", lambda r: r.stats["backup_wins"]),
        ("duplicates_dropped", lambda r: r.stats["duplicates_dropped"]),
        ("coordinator_bytes", lambda r: r.stats["coordinator_bytes"]),
        (
            "coordinator_bytes_per_step",
            lambda r: round(r.stats["coordinator_bytes"] / max(r.stats["steps"], 1)),
        ),
        ("parameters", lambda r: r.stats["parameters"]),
        ("checkpoints_written", lambda r: r.stats.get("checkpoints_written", 0)),
        ("checkpoint_writes_skipped", lambda r: r.stats.get("checkpoint_writes_skipped", 0)),
        ("last_checkpoint", lambda r: r.stats.get("last_checkpoint")),
        ("resumed_from", lambda r: r.stats.get("resumed_from")),
        ("resumed_from_step", lambda r: r.stats.get("resumed_from_step")),
    ),
    rows=(
        ("model", _model),
        ("replicas, shards", _layout),
        ("batch, portions, history", _batch),
        (
            "L-BFGS steps, evaluations",
            lambda s: f"{s['steps']}, {s['function_evals']} ({s['stop']})",
        ),
        ("examples", lambda s: f"{s['examples']:,} in {s['train_s']:.2f} s"),
        ("portions per replica", lambda s: ", ".join(str(n) for n in s["portions_done"])),
        (
            "backup copies / dropped",
            lambda s: f"{s['backup_portions']} / {s['duplicates_dropped']}",
        ),
        ("coordinator bytes / step", lambda s: f"{s['coordinator_bytes_per_step']:,}"),
        ("final training loss", lambda s: _fmt(s["final_loss"], ".4f")),
    ),
)
"""The run's summary beyond its settings: the JSON's keys from the result, the table's rows."""
SandblasterConfig.SUMMARY = SUMMARY
