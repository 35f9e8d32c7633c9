"""Settings, each declared once: its default, check, flag help, owner and policies.

An algorithm's configuration is a frozen dataclass whose fields are made by :meth:`Setting.field`
(or :func:`setting`); the field carries its :class:`Setting` in its metadata. Its
``__post_init__`` calls :func:`validate`, which runs every field's check, and the command
derives from the same declarations its flags and their help, the ``--config`` keys, what a run
records and what a resume may change, and the rows of the summary (see ``distbelief.cli``).
The settings shared by every algorithm (seed, replicas, shards, runtime, timeout, checkpoints)
are declared here, once; each algorithm's own are declared in its ``config.py``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

MAX_SEED = 2**63 - 1
"""torch.manual_seed takes seeds up to 2**64 - 1; numpy's SeedSequence any; the bound is the
smaller signed one, so a seed also fits every int64 field it is recorded in."""

COMMON = "common"
"""The owner of a setting every algorithm takes."""
COMMAND = "command"
"""The owner of a setting of the command only (where output goes, the data file, ...)."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a setting that has none (a required argument of its configuration)."""

Check = Callable[[str, Any], Any]
"""A check: ``check(name, value)`` returns the value as stored (numpy scalars made plain,
paths made absolute) or raises a ConfigError that names the setting."""


@dataclass(frozen=True)
class Setting:
    """One setting: what it is, who owns it, and what the command and a resume do with it."""

    name: str = ""
    """Its name: the configuration field, the API argument, the ``--config`` key (a command
    flag is the name with dashes). Filled in from the field's name when declared in a config."""
    owner: str = COMMON
    """``common`` (every algorithm), an algorithm's name, a runtime's name, or ``command``."""
    default: Any = REQUIRED
    """The configuration's default (REQUIRED: none, a required argument)."""
    default_factory: Callable[[], Any] | None = None
    """For a mutable default (a dict)."""
    check: Check | None = None
    """Validates (and normalises) a value; None: any value."""
    help: str = ""
    """The flag's help (the command fills in ``{preset}``: each preset's value, and
    ``{may_differ}``: the flags a resume may change)."""
    flag: bool = True
    """Whether the command has a flag for it (``--name-with-dashes``)."""
    kind: type = str
    """The type of the flag's value."""
    recorded: bool = True
    """Recorded in a run's config.toml, in the flags a checkpoint keeps and in its manifest's
    configuration (not so where output and checkpoints go, nor the runtime's options)."""
    may_differ: bool = False
    """A resume may change it (more epochs, another runtime); the others must agree."""
    default_on_resume: bool = True
    """A resume takes its recorded value as the default (not so a fault injected, or an
    option of the runtime, which goes with the runtime)."""
    must_agree: bool = False
    """The algorithm refuses a checkpoint taken with another value (its driver checks)."""
    preset: bool = False
    """A preset fills it in when it is not given (the command records the value used)."""
    shown: bool | str = False
    """A key of the run's summary (its JSON): True, or the key if not the name."""
    flag_default: Any = None
    """The flag's default when the configuration's is not wanted: None (not given; a preset
    or the configuration's default applies)."""
    neutral: Any = REQUIRED
    """A value that means "not used": an algorithm that does not take this setting still
    accepts it from the command (e.g. one stage). REQUIRED: none."""

    def field(self, default: Any = REQUIRED, **changes: Any) -> Any:
        """A dataclass field declaring this setting, with ``changes`` (e.g. another owner
        or check) and, if given, another default."""
        s = dataclasses.replace(self, **changes)
        if default is not REQUIRED:
            s = dataclasses.replace(s, default=default)
        meta = {"setting": s}
        if s.default_factory is not None:
            return dataclasses.field(default_factory=s.default_factory, metadata=meta)
        if s.default is REQUIRED:
            return dataclasses.field(metadata=meta)
        return dataclasses.field(default=s.default, metadata=meta)


def setting(default: Any = REQUIRED, **kwargs: Any) -> Any:
    """A dataclass field declaring a setting: ``n_fetch: int = setting(1, check=...)``."""
    return Setting(**kwargs).field(default)


def declared(config: Any) -> dict[str, Setting]:
    """The settings a configuration class (or instance) declares, by name, in field order."""
    out: dict[str, Setting] = {}
    for f in dataclasses.fields(config):
        s = f.metadata.get("setting")
        if s is not None:
            out[f.name] = dataclasses.replace(s, name=f.name)
    return out


def must_agree(config: Any) -> tuple[str, ...]:
    """The settings a resumed run must share with its checkpoint."""
    return tuple(name for name, s in declared(config).items() if s.must_agree)


def validate(config: Any) -> None:
    """Run every declared setting's check on a (frozen) configuration, in field order,
    storing what each check returns."""
    for name, s in declared(config).items():
        if s.check is None:
            continue
        value = getattr(config, name)
        checked = s.check(name, value)
        if checked is not value:
            object.__setattr__(config, name, checked)


Row = tuple[str, Callable[[dict[str, Any]], "str | None"]]
"""A row of a summary table: its label and its text from the summary's dict (None: no row)."""


@dataclass(frozen=True)
class Summary:
    """What a run's summary shows beyond its settings (those declared ``shown``): an
    algorithm declares one beside its configuration (``Config.SUMMARY``)."""

    report: tuple[tuple[str, Callable[[Any], Any]], ...]
    """The JSON's keys taken from the result (a TrainResult), in order."""
    rows: tuple[Row, ...]
    """The table's rows, before the test loss and accuracy."""
    tail: tuple[Row, ...] = ()
    """The table's rows after them."""
    truth_table: bool = False
    """Whether a preset's truth table (xor's) is shown."""


# ------------------------------------------------------------------ checks


def is_int(v: object) -> bool:
    """A count: an integer, numpy's included, not a bool."""
    # numbers.Integral admits numpy's integer scalars (np.int64(32)); bools are not counts.
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _show(v: object) -> str:
    """A value as the user typed it: numpy scalars without their ``np.int64(...)`` wrapper."""
    return repr(v.item()) if isinstance(v, np.generic) else repr(v)


def integer(low: int, optional: bool = False) -> Check:
    """An integer >= ``low`` (or None, if ``optional``), stored as a plain int."""

    def check(name: str, v: Any) -> Any:
        if v is None and optional:
            return None
        if not is_int(v) or v < low:
            tail = " or None" if optional else ""
            raise ConfigError(f"{name}: must be an integer >= {low}{tail}, got {_show(v)}")
        return int(v)  # numpy scalars become plain ints

    return check


def stage_split(name: str, v: Any) -> Any:
    """A stage count >= 1 (stored as a plain int: balanced by parameter count) or split points
    (a list becomes a tuple): the ``stages`` setting of every algorithm that cuts replicas."""
    if isinstance(v, list):
        v = tuple(v)
    if not (is_int(v) or isinstance(v, tuple)):
        raise ConfigError(f"{name}: expected a count or split points, got {v!r}")
    if is_int(v) and v < 1:
        raise ConfigError(f"{name}: must be >= 1, got {v}")
    return int(v) if is_int(v) else v


def number(positive: bool) -> Check:
    """A finite number, > 0 if ``positive`` (else >= 0), stored as a float."""

    def check(name: str, v: Any) -> Any:
        if not _is_real(v) or not math.isfinite(v) or v < 0 or (positive and v == 0):
            bound = "> 0" if positive else ">= 0"
            raise ConfigError(f"{name}: must be a finite number {bound}, got {_show(v)}")
        return float(v)

    return check


def one_of(choices: Iterable[str], what: str | None = None) -> Check:
    """One of ``choices``: ``optimizer: unknown optimizer 'x'; choose one of a, b``."""
    options = tuple(choices)

    def check(name: str, v: Any) -> Any:
        if v not in options:
            raise ConfigError(
                f"{name}: unknown {what or name} {v!r}; choose one of {', '.join(options)}"
            )
        return v

    return check


def seed(name: str, v: Any) -> Any:
    """None (draw one) or an integer from 0 to MAX_SEED."""
    if v is None:
        return None
    if not is_int(v) or not 0 <= v <= MAX_SEED:
        raise ConfigError(f"{name}: must be an integer from 0 to 2**63 - 1 or None, got {_show(v)}")
    return int(v)


def directory(name: str, v: Any) -> Any:
    """None or a directory path, made absolute (a Ray actor has another working directory)."""
    if v is None:
        return None
    if not isinstance(v, (str, os.PathLike)) or not str(v):
        raise ConfigError(f"{name}: expected a directory path, got {_show(v)}")
    return os.path.abspath(v)


def check_checkpoints(config: Any) -> None:
    """Periodic checkpoints need somewhere to go (a check across two settings)."""
    if config.checkpoint_every and config.checkpoint_dir is None:
        raise ConfigError("checkpoint_every: checkpoints need a checkpoint_dir")


# ------------------------------------------------------------------ shared by every algorithm

REPLICAS = Setting(
    default=1, check=integer(1), kind=int, preset=True, shown=True,
    help="Model replicas (preset: {preset}).",
)  # fmt: skip
SHARDS = Setting(
    default=1, check=integer(1), kind=int, preset=True, shown=True,
    help="Parameter-server shards (preset: {preset}).",
)  # fmt: skip
SEED = Setting(
    default=None, check=seed, kind=int, preset=True, shown=True, must_agree=True,
    help="Seeds model init, data order and actor interleaving (default: a fresh random seed, "
    "shown in the summary and kept in the run directory).",
)  # fmt: skip
RUNTIMES = ("local", "processes", "ray", "simulated")
"""The runtimes' names (``distbelief.runtime.make_runtime`` creates each)."""
RUNTIME = Setting(
    default="local", check=one_of(RUNTIMES, "runtime"), flag_default="local", kind=str,
    shown=True, may_differ=True,
    help="Where actors run: local (in-process, one core); processes (forked workers over "
    "shared memory: one machine with several cores); ray (a cluster of machines); simulated "
    "(in-process, in virtual time on a modelled cluster: --cluster FILE.toml).",
)  # fmt: skip
RUNTIME_OPTIONS = Setting(default_factory=dict, flag=False, recorded=False)
TIMEOUT_S = Setting(default=3600.0, check=number(positive=True), flag=False)
CHECKPOINT_DIR = Setting(
    default=None, check=directory, recorded=False, shown=True,
    help="Write checkpoints here (ckpt-<update>; the newest kept): every --checkpoint-every "
    "steps and at the end (default: RUN-DIR/checkpoints; with --resume: the directory resumed "
    "from; with --no-run-dir: none).",
)  # fmt: skip
CHECKPOINT_EVERY = Setting(
    default=0, check=integer(0), kind=int, may_differ=True, shown=True,
    help="Steps (mini-batches over all replicas) between checkpoints (default: one epoch's; "
    "0: at the end only).",
)  # fmt: skip
RESUME = Setting(
    default=None, check=directory, recorded=False,
    help="Carry on from the newest checkpoint in DIR (or a ckpt-* directory): the flags it "
    "recorded are the defaults; {may_differ} may change, the others must agree.",
)  # fmt: skip
