"""The flags of ``distbelief train``, generated from the settings' declarations: each
algorithm's configuration fields (``distbelief.settings``) and the command's own settings,
declared here. A flag's name, help, type, default and resume policy come from its declaration;
this module adds only how ``--help`` groups them."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from .. import algorithms
from ..settings import COMMAND, Setting, declared
from .presets import preset_help

# fmt: off
COMMAND_SETTINGS: tuple[Setting, ...] = (
    Setting("dataset", COMMAND, default=None,
            help="mnist1d (the main job, the default), xor (the seed's example) or digits; or "
            "none with --data FILE."),
    Setting("model", COMMAND, default=None,
            help="Your own model instead of the MLP: path/to/file.py:NAME or "
            "package.module:NAME, where NAME is an nn.Sequential, a list of modules, or a "
            "function returning one (given in_features and out_features, the data's widths, if "
            "it takes them)."),
    Setting("hidden", COMMAND, default=None,
            help="Hidden widths, comma-separated, e.g. 256,256; '' for none (a linear model). "
            "Preset: mnist1d 256,256, xor 2, digits 128,128."),
    Setting("data", COMMAND, default=None,
            help="Train on your own data: a .csv (header row), .parquet, .npz (arrays x, y) or "
            "x.npy (labels in y.npy beside it). The MLP's input and output widths come from "
            "the file; defaults: hidden 128,128, adagrad lr 0.05, batch 32, 20 epochs, "
            "4 replicas x 2 stages, 2 shards."),
    Setting("target", COMMAND, default=None,
            help="The label column (CSV, Parquet; default the last), .npz array (y) or labels "
            ".npy."),
    Setting("test_data", COMMAND, default=None,
            help="Test file, same format and columns as --data."),
    Setting("test_split", COMMAND, default=None, kind=float,
            help="Hold out this fraction of --data for testing (seeded, fixed)."),
    Setting("task", COMMAND, default=None,
            help="classify (cross-entropy) or regress (mse); default: whole-number labels 0..999 "
            "classify, anything else regresses."),
    Setting("train_size", COMMAND, default=None, kind=int,
            help="Use only the first N training examples."),
    Setting("algorithm", COMMAND, default=None,
            help="downpour (asynchronous SGD, default) or sandblaster (L-BFGS)."),
    Setting("model_sha256", COMMAND, default=None, may_differ=True,  # _model_spec checks it
            help="SHA-256 of the --model file as recorded (config.toml, resume)."),
    Setting("address", "ray", default=None, may_differ=True, default_on_resume=False,
            help="Ray cluster address (with --runtime ray)."),
    Setting("shard_updates", "processes", default=None, may_differ=True,
            default_on_resume=False,
            help="With --runtime processes: locked (default; a shard applies one push at a "
            "time) or hogwild (pushes from different processes apply at once, unsynchronized "
            "as in Hogwild; staleness still counted): the fastest on one machine."),
    Setting("cluster", "simulated", default=None, may_differ=True, default_on_resume=False,
            help="With --runtime simulated: the modelled cluster, a TOML file whose keys are "
            "the simulated runtime's options (machines, cores, speeds, placement, compute, "
            "core_flops, bandwidth_Bps, latency_s, ...; docs/simulated.md). Default: 8 "
            "machines of 4 cores, 10 Gbit/s links."),
    Setting("torch_threads", COMMAND, default=1, kind=int, may_differ=True,
            help="torch intra-op threads in this process."),
    Setting("as_json", COMMAND, default=False, kind=bool, recorded=False,
            help="Print one JSON object, last line (no progress)."),
    Setting("quiet", COMMAND, default=False, kind=bool, recorded=False,
            help="No progress display: only the summary."),
    Setting("run_dir", COMMAND, default=None, recorded=False,
            help="Write metrics.jsonl, config.toml and TensorBoard event files here "
            "(default: runs/DATASET-YYYYmmdd-HHMMSS)."),
    Setting("no_run_dir", COMMAND, default=False, kind=bool, recorded=False,
            help="Write no run directory."),
    Setting("config", COMMAND, default=None, recorded=False,
            help="Read flags from a TOML file (keys: the flags' names, e.g. a run directory's "
            "config.toml); flags on the command line win."),
    Setting("inject", COMMAND, default=None, kind=list, may_differ=True,
            default_on_resume=False,
            help="Inject a fault (repeatable): KIND:ACTOR@COUNTER=N, KIND kill or exit, COUNTER "
            "step, update (shards) or message; e.g. kill:replica0.stage1@step=100, "
            "kill:master@message=40. On local and ray every Downpour actor restarts (a shard "
            "restored from the replicas' copies or the checkpoint); processes restarts none. "
            "Or slow an actor (or a replica's stages) down: delay:ACTOR=DURATION, e.g. "
            "delay:shard0=5ms, delay:replica1=0.2s: each message it handles takes that much "
            "longer."),
)
"""The command's own settings (and the runtimes' options it takes as flags)."""

HELP_PANELS: dict[str, tuple[str, ...]] = {
    "Model and data": ("model", "hidden", "data", "target", "test_data", "test_split", "task",
                       "train_size"),
    "Algorithm": ("algorithm", "epochs", "lr", "batch_size", "optimizer", "seed", "n_fetch",
                  "n_push", "warmstart_steps", "steps", "history", "portions"),
    "Layout": ("replicas", "stages", "pipeline_depth", "partitions", "shards"),
    "Runtime": ("runtime", "address", "shard_updates", "cluster", "torch_threads"),
    "Output": ("as_json", "quiet", "run_dir", "no_run_dir", "eval_every", "checkpoint_dir",
               "checkpoint_every", "resume", "config"),
    "Faults": ("inject",),
}
"""The groups of ``train --help``, most used first, and the order of the flags in each. A flag
not listed here is shown after them, under Other (typer would show its default group, Options,
above all of these)."""

METAVARS = {
    "model": "SPEC", "data": "FILE", "test_data": "FILE", "config": "FILE", "run_dir": "DIR",
    "checkpoint_dir": "DIR", "resume": "DIR", "inject": "FAULT", "cluster": "FILE",
}
"""What ``train --help`` shows for a flag's value where its type alone says little."""

NAMES = {"as_json": ("--json",), "quiet": ("--quiet", "-q")}
"""A flag named otherwise than its setting (``--name-with-dashes``)."""
ARGUMENTS = ("dataset",)
"""Settings given as positional arguments."""
HIDDEN = ("model_sha256",)
"""Flags ``--help`` does not show (written by the command into config.toml)."""
# fmt: on


def _flag_settings() -> dict[str, Setting]:
    """Every setting that has a flag, by name: the command's, then each algorithm's fields (a
    name two algorithms declare is one flag, with the first declaration's help)."""
    out = {s.name: s for s in COMMAND_SETTINGS}
    for name in algorithms.names():
        for key, s in declared(algorithms.get(name).config).items():
            if not s.flag:
                continue
            if key not in out:
                out[key] = s
            elif not out[key].help:
                out[key] = dataclasses.replace(s, owner=out[key].owner)
    return out


SETTINGS: dict[str, Setting] = _flag_settings()
"""The settings of ``distbelief train``'s flags, by name."""

# The policies, derived from the declarations.
NOT_RECORDED = frozenset(k for k, s in SETTINGS.items() if not s.recorded)
"""Flags that shape the output (or say where checkpoints go), not the run: left out of a run's
config.toml and of the flags a checkpoint records."""
NOT_DEFAULT_ON_RESUME = frozenset(k for k, s in SETTINGS.items() if not s.default_on_resume)
"""Recorded flags that ``--resume`` does not take as defaults: a fault injected into the run
that wrote it is not injected again, and the runtime's own options go with the runtime."""
MAY_DIFFER_ON_RESUME = frozenset(k for k, s in SETTINGS.items() if s.may_differ)
"""Recorded flags that ``--resume`` lets the command line change; the others shape the model,
the data, its order or the update rules' state, and must agree."""


def owners(name: str) -> tuple[str, ...]:
    """The algorithms whose configuration takes setting ``name`` (none: the command's)."""
    return tuple(a for a in algorithms.names() if name in declared(algorithms.get(a).config))


def flag_of(name: str) -> str:
    """A setting's flag as the user types it, without dashes: ``n-fetch``."""
    return name.replace("_", "-")


def order() -> list[str]:
    """The flags in ``--help`` order: arguments, then the panels', then the others."""
    placed = [name for names in HELP_PANELS.values() for name in names]
    rest = [k for k in SETTINGS if k not in placed and k not in ARGUMENTS]
    return [*ARGUMENTS, *placed, *rest]


def _help(s: Setting) -> str:
    may = [flag_of(k) for k in order() if k in MAY_DIFFER_ON_RESUME and k not in HIDDEN]
    may = ", ".join(may[:-1]) + " and " + may[-1]
    return s.help.replace("{preset}", preset_help(s.name) if "{preset}" in s.help else "").replace(
        "{may_differ}", may
    )


def _parameter(s: Setting, callbacks: dict[str, Callable[..., Any]]) -> inspect.Parameter:
    """The typer parameter of a setting's flag."""
    command = any(s is c for c in COMMAND_SETTINGS)
    default = s.default if command else s.flag_default
    help_text = _help(s)
    if s.name == "algorithm":
        default = algorithms.names()[0]
    if s.name in ARGUMENTS:
        info = typer.Argument(help=help_text, show_default=False)
    elif s.name in callbacks:
        info = typer.Option(f"--{flag_of(s.name)}", help=help_text, is_eager=True,
                            callback=callbacks[s.name], show_default=False)  # fmt: skip
    elif s.kind is bool:
        names = NAMES.get(s.name, (f"--{flag_of(s.name)}",))
        info = typer.Option(*names, help=help_text)
    elif s.name in HIDDEN:
        info = typer.Option(hidden=True, help=help_text)
    else:
        info = typer.Option(*NAMES.get(s.name, ()), help=help_text, show_default=False)
    kind: Any = list[str] if s.kind is list else s.kind
    if default is None:
        kind = kind | None
    return inspect.Parameter(
        s.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
    )


def signature(callbacks: dict[str, Callable[..., Any]]) -> inspect.Signature:
    """The train command's signature (typer reads it): a context, then every flag, in
    ``--help`` order; ``callbacks`` are the eager flags' (``--config``, ``--resume``)."""
    ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                            annotation=typer.Context)  # fmt: skip
    params = [_parameter(SETTINGS[name], callbacks) for name in order()]
    return inspect.Signature([ctx, *params], return_annotation=None)


def arrange_help(group: Any) -> None:
    """Order and group the flags of ``train --help`` (HELP_PANELS), and show no ``<bool>``
    after a flag that takes no value, in every command."""
    for command in (group, *group.commands.values()):
        # click makes its --help option on first use and keeps it: make it now, to set it
        help_option = command.get_help_option(typer.Context(command, info_name=command.name))
        for param in (*command.params, *([help_option] if help_option else [])):
            if getattr(param, "is_flag", False):
                param.metavar = ""  # the type column stays empty
            if command.name == "train" and param is help_option:
                param.rich_help_panel = "Output"  # not alone in a panel above the others
    train = group.commands.get("train")
    if train is None:
        return
    for param in train.params:
        param.metavar = METAVARS.get(param.name, param.metavar)
    panel_of = {name: panel for panel, names in HELP_PANELS.items() for name in names}
    rank = {name: i for i, name in enumerate(panel_of)}
    for param in train.params:
        if param.param_type_name == "option":
            param.rich_help_panel = panel_of.get(param.name, "Other")
    # the DATASET argument first, then the panels' flags in order, then any other flag
    train.params.sort(key=lambda p: -1 if p.param_type_name == "argument" else rank.get(
        p.name, len(rank)))  # fmt: skip
