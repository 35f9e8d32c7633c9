"""The ``train`` command: a preset's MLP on its dataset, or any model on any data, with any
registered algorithm. Its flags are generated from the settings' declarations
(``cli.options``); this module resolves them (flag, else the preset's, else the
configuration's default), records them, runs the job and writes the summary."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from torch import nn

from .. import algorithms
from .. import models as modelspec
from ..core.partition import as_layers, layer_sizes, resolve_split_points
from ..data import inputs as datasets
from ..data.formats import CLASSIFY, FileData
from ..errors import ConfigError, NothingToTrain, TrainingInterrupted
from ..runtime import faults
from ..runtime.processes import SHARD_UPDATES
from ..settings import REQUIRED, declared
from ..storage import checkpoint as checkpoints
from ..storage.runlog import RunLog, default_run_dir
from .app import Interrupted, UsageFailure, app, prose, seam, strict_json
from .options import NOT_RECORDED, SETTINGS, flag_of, signature
from .presets import (
    PRESETS,
    Preset,
    build_model,
    check_model_fits,
    file_preset,
    parse_hidden,
    task_line,
)
from .resume import (
    check_resume_flags,
    check_resumed_model,
    load_config,
    load_resume,
    model_spec,
    nothing_to_train,
)
from .summary import print_summary, summary
from .views import _LiveView

EVALUATIONS = (10, 50)
"""Fewest and most evaluations of a run with a run directory, by default: one per epoch
within these bounds, so that every run's report draws a curve and a long one is not slowed
(an evaluation of the main job's 2,000 test examples costs about 1% of an epoch)."""

LATER = ("checkpoint_dir", "checkpoint_every", "resume")
"""Settings the command resolves once it knows the run directory (not from a preset)."""


def default_eval_every(examples: int, epochs: int) -> int:
    """Training examples between evaluations when none is given and a run directory is
    written: one epoch (``examples``), or a tenth of the run if it has fewer than 10 epochs,
    or a fiftieth if it has more than 50."""
    evaluations = min(max(epochs, EVALUATIONS[0]), EVALUATIONS[1])
    return max(1, math.ceil(examples * epochs / evaluations))


@prose
def train_command(ctx: typer.Context, **f: Any) -> None:
    """Train a model with Downpour SGD or Sandblaster L-BFGS: a preset's, or any model on any
    data.

    Trains a preset's MLP on DATASET, or your own model (--model FILE.py:NAME) on your own
    data (--data FILE), with Downpour SGD (asynchronous, the default) or Sandblaster L-BFGS,
    and prints a summary (or JSON).

    Presets (every flag overrides them): mnist1d: MLP 40-256-256-10, 4 replicas x 2 stages,
    2 shards, adagrad lr 0.05, batch 32, 15 epochs. xor: 2-2-1 sigmoid, 25 replicas x 2
    stages, 2 shards, sgd lr 0.5, batch 1, 1 epoch. digits: MLP 64-128-128-10, 4 replicas
    x 2 stages, 2 shards, adagrad lr 0.05, batch 32, 20 epochs.

    With a run directory (the default: runs/DATASET-TIME) the run evaluates on the test set
    every epoch and distbelief report DIR plots its curves.
    """
    t_start = time.perf_counter()
    dataset, preset, train_rows = _choose_data(f)
    _check_command_flags(f)
    if f["seed"] is None:  # as the API does: draw one, and say which (summary, JSON, config)
        f["seed"] = random.SystemRandom().randrange(2**31)
    spec = model_spec(ctx, f["model"], f["hidden"], f["model_sha256"])
    widths: Sequence[int] = ()
    if spec is not None:
        if f["runtime"] == "ray":
            modelspec.ship_by_value(spec)
    else:
        widths = preset.hidden if f["hidden"] is None else parse_hidden(f["hidden"])
        check_model_fits(preset, widths)
    settings, net = _algorithm_settings(ctx, f, preset, dataset, spec, widths)
    _runtime_options(f, settings)
    resolved = _record(ctx, f, settings, spec, widths, dataset)
    if f["resume"] is not None and _nothing_left(ctx, f, net, settings, resolved):
        return
    runlog = _run_log(f, dataset, resolved)
    if settings.get("eval_every", 0) is None and runlog is None:
        settings["eval_every"] = 0  # no curves to draw: evaluate at the end only
    checkpoint_dir = f["checkpoint_dir"]
    if checkpoint_dir is None and runlog is not None:  # a crash never loses the whole run
        checkpoint_dir = str(runlog.path / "checkpoints")
    settings.update(
        checkpoint_dir=checkpoint_dir, checkpoint_every=f["checkpoint_every"],
        resume=f["resume"], checkpoint_meta=resolved,
    )  # fmt: skip
    # Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine torch's
    # spinning worker threads made the main job 20-80x slower (measured); one thread is robust.
    threads = torch.get_num_threads()
    torch.set_num_threads(f["torch_threads"])
    try:
        # The task decides the loss and the outputs: the header says which and why.
        note = task_line(train_rows) if train_rows is not None else ""
        quiet = f["quiet"] or f["as_json"]
        s = _run_job(dataset, preset, net, widths, settings, f["train_size"], quiet, runlog, note)
    except NothingToTrain as exc:
        if runlog is not None:
            runlog.discard()  # nothing was written in it
        nothing_to_train(str(exc).split(": ", 1)[1], Path(f["resume"] or ""), f["as_json"])
        return
    finally:
        torch.set_num_threads(threads)
        if runlog is not None:
            runlog.close("failed")  # no-op after a finished run
    if train_rows is not None:
        s["task"] = "classify" if preset.loss == "cross_entropy" else "regress"
        s["task_reason"] = train_rows.task_reason
    s["model"] = f["model"] if spec is not None else None
    s["command_s"] = round(time.perf_counter() - t_start, 3)
    s["run_dir"] = str(runlog.path) if runlog is not None else None
    if f["as_json"]:
        print(strict_json(s))
    else:
        print_summary(Console(), s)


def _run_log(f: dict[str, Any], dataset: str, resolved: dict[str, Any]) -> RunLog | None:
    """The run directory (unless --no-run-dir), made before any data is generated or
    trained: an unusable directory ends the command here."""
    if f["no_run_dir"]:
        return None
    name = Path(f["data"]).stem if f["data"] else dataset
    path = f["run_dir"] if f["run_dir"] is not None else default_run_dir(name)
    try:
        return RunLog(path, resolved, name="run-dir")
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


train_command.__signature__ = signature(  # type: ignore[attr-defined]
    {"resume": load_resume, "config": load_config}
)
app.command("train")(train_command)


def _choose_data(f: dict[str, Any]) -> tuple[str, Preset, FileData | None]:
    """The dataset's name, its preset and (for ``--data FILE``) the scanned training file."""
    data = f["data"]
    if data is None:
        given = [
            flag_of(k) for k in ("target", "test_data", "test_split", "task") if f[k] is not None
        ]
        if given:
            raise UsageFailure(f"{given[0]}: only meaningful with --data FILE")
        dataset = f["dataset"] or next(iter(PRESETS))
        preset = PRESETS.get(dataset)
        if preset is None:
            raise UsageFailure(
                f"dataset: unknown dataset {dataset!r}; choose one of {', '.join(PRESETS)}"
            )
        return dataset, preset, None
    if f["dataset"] is not None:
        raise UsageFailure(f"data: give a dataset name ({f['dataset']!r}) or --data FILE, not both")
    preset, train_rows, _ = file_preset(
        data, f["target"], f["test_data"], f["test_split"], f["task"]
    )
    return data, preset, train_rows


def _check_command_flags(f: dict[str, Any]) -> None:
    """The command's own flags, and where checkpoints go (resumed: where they came from)."""
    cores = os.cpu_count() or 1
    if not 1 <= f["torch_threads"] <= cores:
        # torch.set_num_threads(100000) crashed the process (SIGSEGV), not an error
        raise UsageFailure(
            f"torch-threads: must be an integer from 1 to {cores} (this machine's cores), "
            f"got {f['torch_threads']}"
        )
    if f["train_size"] is not None and f["train_size"] < 1:
        raise UsageFailure(f"train-size: must be an integer >= 1, got {f['train_size']}")
    if f["address"] is not None and f["runtime"] != SETTINGS["address"].owner:
        raise UsageFailure(f"address: only meaningful with --runtime {SETTINGS['address'].owner}")
    if f["run_dir"] is not None and f["no_run_dir"]:
        raise UsageFailure("run-dir: --run-dir and --no-run-dir contradict each other")
    if f["resume"] is not None and f["config"] is not None:
        raise UsageFailure("resume: --resume takes the flags from the checkpoint; drop --config")
    if f["checkpoint_every"] is not None and f["checkpoint_every"] < 0:
        raise UsageFailure(
            f"checkpoint-every: must be an integer >= 0, got {f['checkpoint_every']}"
        )
    if f["resume"] is not None and f["checkpoint_dir"] is None:
        # Carry on checkpointing where the checkpoint came from (a chain of kills and resumes).
        found = Path(os.path.abspath(f["resume"]))
        manifest = (found / checkpoints.MANIFEST).is_file()
        f["checkpoint_dir"] = str(found.parent if manifest else found)
    if f["checkpoint_every"] and f["checkpoint_dir"] is None and f["no_run_dir"]:
        raise UsageFailure(
            "checkpoint-every: give --checkpoint-dir DIR (with --no-run-dir there is no run "
            "directory to hold the checkpoints)"
        )


def _check_algorithm(ctx: typer.Context, f: dict[str, Any]) -> str:
    """The algorithm chosen: the checkpoint's when resuming, a registered one, and given no
    option of another algorithm (unless at its neutral value, e.g. one stage)."""
    algorithm = f["algorithm"]
    names = algorithms.names()
    if f["resume"] is not None:
        recorded = ctx.meta["resume"][1].get("algorithm", names[0])
        if algorithm != recorded:  # before its flags (lr, ...) are blamed for the difference
            raise UsageFailure(
                f"algorithm: {ctx.meta['resume'][0]} is a checkpoint of a {recorded} run; resume "
                f"it with --algorithm {recorded} (or leave the flag out)"
            )
    if algorithm not in names:
        raise UsageFailure(
            f"algorithm: unknown algorithm {algorithm!r}; choose {' or '.join(names)}"
        )
    own = declared(algorithms.get(algorithm).config)
    for other in names:
        for name, s in declared(algorithms.get(other).config).items():
            value = f.get(name)
            if name in own or not s.flag or value is None or value == s.neutral:
                continue
            if other == names[0]:
                raise UsageFailure(
                    f"{flag_of(name)}: a {other.capitalize()} option; --algorithm {algorithm} "
                    "does not take it"
                )
            raise UsageFailure(
                f"{flag_of(name)}: a {other.capitalize()} option; give --algorithm {other}"
            )
    return algorithm


def _algorithm_settings(
    ctx: typer.Context,
    f: dict[str, Any],
    preset: Preset,
    dataset: str,
    spec: modelspec.ModelSpec | None,
    widths: Sequence[int],
) -> tuple[dict[str, Any], nn.Sequential]:
    """The arguments of ``train`` for the chosen algorithm: each of its settings from its
    flag, else the preset's value, else the configuration's default; checked (with the
    model, built here) before seconds of data generation."""
    algorithm = _check_algorithm(ctx, f)
    config = algorithms.get(algorithm).config
    presets = preset.settings(algorithm)
    settings: dict[str, Any] = {"algorithm": algorithm}
    for name, s in declared(config).items():
        if s.flag and name not in LATER:
            given = f.get(name)
            default = None if s.default is REQUIRED else s.default
            settings[name] = given if given is not None else presets.get(name, default)
    if "eval_every" in settings:
        settings["eval_every"] = f["eval_every"]  # None: chosen once the data's size is known
    address = f["address"]
    settings["runtime_options"] = {"address": address} if address is not None else {}
    try:  # fail fast, before seconds of data generation
        checked = {k: v for k, v in settings.items() if k != "algorithm"}
        if "eval_every" in checked:
            checked["eval_every"] = checked["eval_every"] or 0
        run = config(**checked)
        net = build_model(preset, widths, f["seed"], spec)
        if getattr(run, "stages", None) is not None:
            resolve_split_points(layer_sizes(as_layers(net)), run.stages)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    return settings, net


def _runtime_options(f: dict[str, Any], settings: dict[str, Any]) -> None:
    """The runtime's options given as flags (``--shard-updates``, ``--cluster``) and the
    faults to inject."""
    if f["shard_updates"] is not None:
        runtime = SETTINGS["shard_updates"].owner
        if f["runtime"] != runtime:
            raise UsageFailure(f"shard-updates: applies to --runtime {runtime} only")
        if f["shard_updates"] not in SHARD_UPDATES:
            raise UsageFailure(
                f"shard-updates: choose {' or '.join(SHARD_UPDATES)}, got {f['shard_updates']!r}"
            )
        settings["runtime_options"]["shard_updates"] = f["shard_updates"]
    if f["cluster"] is not None:
        if f["runtime"] != SETTINGS["cluster"].owner:
            raise UsageFailure(f"cluster: applies to --runtime {SETTINGS['cluster'].owner} only")
        from ..runtime.simulated import read_cluster  # torch's FLOP counter: only when asked

        try:
            settings["runtime_options"].update(read_cluster(f["cluster"]))
        except ConfigError as exc:
            raise UsageFailure(str(exc)) from None
    if f["inject"]:
        try:
            settings["runtime_options"]["faults"] = list(faults.plan(f["inject"]))
        except ConfigError as exc:
            raise UsageFailure("inject" + str(exc).removeprefix("faults")) from None


def _record(
    ctx: typer.Context,
    f: dict[str, Any],
    settings: dict[str, Any],
    spec: modelspec.ModelSpec | None,
    widths: Sequence[int],
    dataset: str,
) -> dict[str, Any]:
    """What config.toml records: every flag of this command as resolved (the presets' values
    filled in, the seed drawn), so --config on it runs the same configuration again."""
    resolved = {k: v for k, v in ctx.params.items() if k not in NOT_RECORDED and v is not None}
    resolved.update({k: settings[k] for k in resolved.keys() & settings.keys()})
    filled = [k for k, s in SETTINGS.items() if s.preset and settings.get(k) is not None]
    resolved.update({k: settings[k] for k in filled})
    if spec is None:
        resolved["hidden"] = ",".join(map(str, widths))
    else:  # the file's hash: resuming (or --config) with an edited file is refused
        resolved.pop("hidden", None)
        resolved["model_sha256"] = spec.sha256
    if f["data"] is None:
        resolved["dataset"] = dataset  # the default (mnist1d) too: a report names it
    order = [p.name for p in ctx.command.params]
    return dict(sorted(resolved.items(), key=lambda kv: order.index(kv[0])))


def _nothing_left(
    ctx: typer.Context,
    f: dict[str, Any],
    net: nn.Sequential,
    settings: dict[str, Any],
    resolved: dict[str, Any],
) -> bool:
    """Check a resumed run's flags against its checkpoint; say so (and return True) if it has
    nothing left to train, before any directory is made. (An algorithm counted in steps, not
    epochs, is judged by ``train``: NothingToTrain.)"""
    check_resume_flags(*ctx.meta["resume"], resolved)
    ckpt = ctx.meta["resume_checkpoint"]
    if "epochs" not in settings:
        return False
    train_examples = ckpt.manifest["config"].get("train_examples", 0)
    left = checkpoints.nothing_left(ckpt, settings["epochs"], train_examples)
    if left is None:
        return False
    check_resumed_model(ckpt, net, settings)  # another model is an error first
    nothing_to_train(f"{left}; give more --epochs to train on", ckpt.path, f["as_json"])
    return True


def _load(
    preset: Preset, settings: dict[str, Any], train_size: int | None
) -> tuple[datasets.Data | FileData, Any]:
    """The preset's data (its first ``train_size`` training examples), read whole for an
    algorithm whose replicas take it in memory."""
    train_data, test_data = preset.load(settings["seed"])
    if train_size is not None and isinstance(train_data, FileData):
        train_data = train_data.part(0, min(train_size, len(train_data)))  # the rest is not read
    elif train_size is not None:
        train_data = (train_data[0][:train_size], train_data[1][:train_size])
    config = algorithms.get(settings["algorithm"]).config
    if config.IN_MEMORY and isinstance(train_data, FileData):
        train_data = _in_memory(train_data, settings["algorithm"])
    return train_data, test_data


def _run_job(
    dataset: str,
    preset: Preset,
    model: nn.Sequential,
    widths: Sequence[int],
    settings: dict[str, Any],
    train_size: int | None,
    quiet: bool,
    runlog: RunLog | None = None,
    note: str = "",
) -> dict[str, Any]:
    """Load the data, train with a live view on stderr (unless quiet), summarise. ``note``: a
    line to show under the header (the data file's task)."""
    t_data = time.perf_counter()
    train_data, test_data = _load(preset, settings, train_size)
    data_s = time.perf_counter() - t_data
    if "eval_every" in settings and settings["eval_every"] is None:
        size = len(train_data[0] if isinstance(train_data, tuple) else train_data)
        every = default_eval_every(size, settings["epochs"])
        settings["eval_every"] = every
        for recorded in (runlog.config if runlog else None, settings.get("checkpoint_meta")):
            if recorded is not None:  # config.toml reruns it with the same evaluations
                recorded["eval_every"] = every
    t_train = time.perf_counter()
    try:
        where = f", run directory {runlog.path}" if runlog is not None else ""
        header = f"{dataset}: seed {settings['seed']}{where}" + (f"\n{note}" if note else "")
        view = _LiveView(Console(stderr=True), dataset, settings["replicas"], not quiet, header)
        with view:
            result = seam("train")(model, train_data, loss=preset.loss, eval_data=test_data,
                                   progress=view, run_dir=runlog, **settings)  # fmt: skip
    except NothingToTrain:
        raise  # not a usage error: said by the command, exit 0
    except ConfigError as exc:
        if runlog is not None:
            runlog.discard()  # nothing was trained: leave no empty run directory behind
        raise UsageFailure(str(exc)) from None
    except TrainingInterrupted as exc:
        raise Interrupted(exc.signum, exc.checkpoint, exc.step) from None
    wall_s = time.perf_counter() - t_train
    return summary(dataset, result, widths, wall_s, data_s, test_data, preset.truth_table)


def _in_memory(rows: FileData, algorithm: str) -> datasets.Data:
    """A data file read whole, for an algorithm whose replicas take in-memory data: refused,
    naming the flag, if it would take more than half the memory available."""
    need = len(rows) * (rows.width * 4 + 8 * max(1, rows.outputs if rows.task != CLASSIFY else 1))
    free = seam("available_memory")()
    if free is not None and need > free // 2:
        streams = [a for a in algorithms.names() if not algorithms.get(a).config.IN_MEMORY]
        raise UsageFailure(
            f"data: --algorithm {algorithm} holds the training data in memory, and {rows.path} "
            f"({len(rows):,} examples, {need / 2**30:.1f} GiB) would take more than half the "
            f"{free / 2**30:.1f} GiB available; use --train-size N, or "
            f"{' or '.join(a.capitalize() for a in streams)}, which reads the file part by part"
        )
    return rows.read(range(len(rows)))
