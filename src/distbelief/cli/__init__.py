"""The ``distbelief`` command: train a preset job (MNIST-1D, XOR, digits) or any model on any
data, run the benchmarks, report on runs.

``distbelief train`` with no arguments is the main job: MNIST-1D, an MLP 40-256-256-10, Downpour
SGD with Adagrad at the shards, 4 replicas x 2 stages over 2 PS shards, in-process runtime.
Invalid arguments exit with status 2 and one line on stderr, never a traceback.

The package: ``app`` (the typer app, exit statuses), ``options`` (the flags, generated from the
settings' declarations), ``presets``, ``resume`` (``--config``, ``--resume``), ``training`` (the
train command), ``summary``, ``views`` (the live progress view), ``tools`` (bench, report) and
``main`` (the console script).
"""

from __future__ import annotations

from ..api import available_memory, train
from ..errors import ConfigError
from .app import (
    INTERRUPTED,
    RUN_ERROR,
    USAGE_ERROR,
    Interrupted,
    UsageFailure,
    app,
    prose,
    strict_json,
)
from .main import entry, main
from .options import (
    HELP_PANELS,
    MAY_DIFFER_ON_RESUME,
    METAVARS,
    NOT_DEFAULT_ON_RESUME,
    NOT_RECORDED,
    arrange_help,
)
from .presets import PRESETS, Preset, build_mlp, build_model, file_preset, parse_hidden
from .summary import print_summary, summary
from .tools import bench_command, report_command
from .training import EVALUATIONS, default_eval_every, train_command
from .views import _LiveView

__all__ = [
    "EVALUATIONS", "HELP_PANELS", "INTERRUPTED", "MAY_DIFFER_ON_RESUME", "METAVARS",
    "NOT_DEFAULT_ON_RESUME", "NOT_RECORDED", "PRESETS", "RUN_ERROR", "USAGE_ERROR",
    "ConfigError", "Interrupted", "Preset", "UsageFailure", "_LiveView", "app", "arrange_help",
    "available_memory", "bench_command", "build_mlp", "build_model", "default_eval_every",
    "entry", "file_preset", "main", "parse_hidden", "print_summary", "prose", "report_command",
    "strict_json", "summary", "train", "train_command",
]  # fmt: skip
