"""The public entry point: ``distbelief.train`` checks every input (``checks``), looks the
algorithm up in the registry (``algorithms``) and hands the checked run to its driver. It
names no algorithm: each one's own arguments, checks and defaults are its package's."""

from __future__ import annotations

import dataclasses
import inspect
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from . import algorithms
from .algorithms.driver import Job, runtime_name
from .checks import (
    available_memory,
    check_checkpoint_dir,
    check_inputs,
    check_memory,
    check_targets,
    dry_run,
    resolve_loss,
    rows_of,
)
from .core.flat import parameters_of
from .core.partition import as_layers, layer_sizes, model_dtype, resolve_split_points, split_layers
from .data.inputs import TensorRows, check_device
from .errors import ConfigError
from .evaluate import LOSSES, Evaluator, LossFn, Metric, default_metric
from .results import ProgressReport, TrainResult
from .runtime import Runtime
from .storage.dirlock import DirectoryLock
from .storage.runlog import RunLog

__all__ = ["LOSSES", "LossFn", "Metric", "available_memory", "train"]


def train(
    model: nn.Module | Sequence[nn.Module],
    train_data: Any,
    *,
    loss: str | LossFn,
    algorithm: str = "downpour",
    lr: float | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    stages: int | Sequence[int] = 1,
    pipeline_depth: int = 1,
    partitions: int = 1,
    replicas: int = 1,
    shards: int = 1,
    optimizer: str | None = None,
    n_fetch: int | None = None,
    n_push: int | None = None,
    warmstart_steps: int | None = None,
    steps: int | None = None,
    history: int | None = None,
    portions: int | None = None,
    eval_data: Any = None,
    seed: int | None = None,
    runtime: str | Runtime = "local",
    local_lr: float | None = None,
    eval_every: int = 0,
    metric: Metric | None = None,
    timeout_s: float = 3600.0,
    runtime_options: dict[str, Any] | None = None,
    progress: Callable[[ProgressReport], None] | None = None,
    run_dir: str | os.PathLike | RunLog | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike | None = None,
    checkpoint_meta: Any = None,
) -> TrainResult:
    """Train ``model`` with Downpour SGD (``algorithm="downpour"``, the default:
    ``replicas`` asynchronous model replicas, each split into ``stages`` by layer, over a
    parameter server of ``shards`` shards) or Sandblaster L-BFGS (``"sandblaster"``: a
    coordinator runs L-BFGS over the shards, replicas compute gradients of portions).

    ``model`` is an ``nn.Sequential`` (or a list of modules); its current parameters are the
    initial ones and it is not modified. ``train_data``/``eval_data`` are ``(X, y)`` tensors or
    a torch ``Dataset``. ``loss`` is ``"cross_entropy"``, ``"mse"`` or a callable
    ``(output, target) -> scalar``. Every input is checked before any actor starts; a bad one
    raises :class:`ConfigError` naming the parameter. Downpour needs ``lr``, ``batch_size`` and
    ``epochs`` (see ``DownpourConfig``); Sandblaster takes ``steps``, ``history``,
    ``portions`` and an optional ``batch_size`` (see ``SandblasterConfig``). An option of the
    other algorithm is a ``ConfigError``.
    ``pipeline_depth`` (Downpour only, with ``stages`` > 1): mini-batches each replica keeps in
    flight through its stages, each backward pass with the parameters its own forward pass
    used (weight stashing); 1 (default): one at a time (see ``docs/pipelining.md``).
    ``partitions`` (Downpour and Sandblaster, as ``stages``): each stage's layers cut into this
    many blocks of units, one actor per block, which send each other only what crosses their
    boundaries (the paper's Figure 1; ``Linear``, ``distbelief.nn.LocallyConnected1d/2d``,
    element-wise layers, ``Flatten``, ``Unflatten``); 1 (default): one actor per stage (see
    ``docs/partitions.md``).
    ``run_dir`` (a path, or a :class:`RunLog`): write ``metrics.jsonl``, ``config.toml`` and
    TensorBoard event files there (see ``runlog``); None (default) writes nothing.
    ``checkpoint_dir``, ``checkpoint_every``, ``resume`` (Downpour only): write checkpoints
    every ``checkpoint_every`` steps (default: every epoch, i.e. each replica's mini-batches
    of one pass, added up; 0: none but the final one) and at the end, or carry on from one
    (see ``DownpourConfig``). A run with a ``run_dir`` and no ``checkpoint_dir`` writes them
    into ``<run_dir>/checkpoints``: a crash never loses the whole run. Steps, not seconds, so
    same-seed in-process runs stay bit-identical. Resuming takes the seed from the checkpoint
    when ``seed`` is None, and refuses (``ConfigError``) a checkpoint of another model,
    layout, replica count, batch size, update rule, rate or seed. ``checkpoint_meta``: JSON
    recorded in every checkpoint's manifest (the CLI records its flags there).
    A shard the runtime restarts is restored from the newest checkpoint in ``checkpoint_dir``
    when it is newer than the replicas' copies of its slice.
    ``runtime`` is a name (``"local"``, ``"processes"``, ``"ray"``) or a runtime already
    created (e.g. a ``LocalRuntime``), which then hosts this one run and is shut down when
    ``train`` returns or raises; its options are given when creating it, not in
    ``runtime_options`` (which then holds only the algorithm's own).
    """
    arguments = dict(locals())  # first, before any other name is bound
    chosen = algorithms.get(algorithm)
    settings = _config_arguments(arguments)
    name = runtime_name(runtime)
    instance = runtime if name is not None else None
    if instance is not None:
        settings["runtime"] = name  # the config, run directories and checkpoints record it
    try:
        return _train(chosen, instance, model, train_data, loss, eval_data, metric, progress,
                      run_dir, checkpoint_meta, settings)  # fmt: skip
    finally:
        if instance is not None:  # a runtime passed in serves this one run
            instance.shutdown()


def _config_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """``train()``'s arguments that shape an algorithm's config (what its ``configure`` gets):
    those named as a field of some registered algorithm's config."""
    fields = {
        f.name for n in algorithms.names() for f in dataclasses.fields(algorithms.get(n).config)
    }
    return {name: value for name, value in arguments.items() if name in fields}


def _train(
    chosen: algorithms.Algorithm,
    instance: Runtime | None,
    model: nn.Module | Sequence[nn.Module],
    train_data: Any,
    loss: str | LossFn,
    eval_data: Any,
    metric: Metric | None,
    progress: Callable[[ProgressReport], None] | None,
    run_dir: str | os.PathLike | RunLog | None,
    checkpoint_meta: Any,
    settings: dict[str, Any],
) -> TrainResult:
    """``train`` once the algorithm is known: check, then run (see ``train``)."""
    config, ckpt = _configure(chosen, instance, settings, run_dir)
    layers = as_layers(model)
    for i, layer in enumerate(layers):
        for pname, values in (*layer.named_parameters(), *layer.named_buffers()):
            check_device(values.data, f"model: layer {i} ({type(layer).__name__}) {pname} is")
    dtype = model_dtype(layers)
    loss_fn = resolve_loss(loss)
    if metric is not None and not callable(metric):
        raise ConfigError(
            f"metric: must be a function (outputs, targets) -> float, got {metric!r} "
            "(the default already reports accuracy for a classification loss)"
        )
    rows = rows_of(train_data, "train_data", dtype, loss)
    x, y = rows.probe()  # in-memory data: all of it; a file: the rows that decide the checks
    if config.replicas > len(rows):
        raise ConfigError(
            f"replicas: {config.replicas} replicas but only {len(rows)} training examples"
        )
    sizes = layer_sizes(layers)
    points = resolve_split_points(sizes, getattr(config, "stages", 1))
    stage_layers = split_layers(layers, points)
    stage_of = [s for s, group in enumerate(stage_layers) for _ in group]
    total = sum(sizes)
    if config.shards > total:
        raise ConfigError(f"shards: {config.shards} shards but the model has {total} parameters")
    check_memory(total, dtype, config, chosen.memory(config))
    if total and not any(p.requires_grad for p in parameters_of(layers)):
        raise ConfigError("model: no parameter requires grad, so there is nothing to train")
    check_inputs("train_data", layers, x, y)  # a file's every row: checked when scanned
    config = chosen.check(config, settings, layers, rows, dtype)
    # Two examples, not one: a custom loss that forgets to reduce over the batch shows up.
    out = dry_run(layers, stage_of, x[:2])
    check_targets("train_data", out, y, loss, loss_fn)
    evaluator = None
    if eval_data is not None:
        eval_rows = rows_of(eval_data, "eval_data", dtype, loss, like=rows)
        ex, ey = eval_rows.probe()  # in-memory data: all of it
        check_inputs("eval_data", layers, ex, ey)
        check_targets(
            "eval_data", dry_run(layers, stage_of, ex[:2], "eval_data"), ey, loss, loss_fn
        )
        metric = metric or default_metric(loss, ey)
        data = (ex, ey) if isinstance(eval_rows, TensorRows) else eval_rows
        evaluator = Evaluator(stage_layers, data, loss_fn, metric)
    if config.resume is not None:
        ckpt = chosen.resume(config, stage_layers, len(rows), ckpt)
    job = Job(config, layers, stage_layers, dtype, loss_fn, rows, evaluator, progress, ckpt,
              checkpoint_meta, instance)  # fmt: skip
    # One run at a time per checkpoint directory: a second one would remove the first's
    # checkpoints. Taken after every check, before anything is written.
    lock = None
    if config.checkpoint_dir is not None:
        lock = DirectoryLock(config.checkpoint_dir, "checkpoint_dir").acquire()
    try:
        return _run(chosen, job, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _configure(
    chosen: algorithms.Algorithm,
    instance: Runtime | None,
    settings: dict[str, Any],
    run_dir: str | os.PathLike | RunLog | None,
) -> tuple[Any, Any]:
    """The algorithm's config of ``settings`` (a seed drawn if none is given), and the
    checkpoint it loaded to make it (or None)."""
    algorithms.refuse_others(chosen, _given(settings))
    algorithms.require(chosen, settings)
    if settings["checkpoint_dir"] is None and run_dir is not None:
        root = run_dir.path if isinstance(run_dir, RunLog) else run_dir
        settings["checkpoint_dir"] = os.path.join(root, "checkpoints")
    config, ckpt = chosen.configure(settings)
    if instance is not None:
        extra = sorted(set(config.runtime_options) - set(chosen.options))
        if extra:
            raise ConfigError(
                f"runtime_options: {', '.join(extra)}: options of the runtime, which was "
                "passed in already created; give them when creating it"
            )
    check_checkpoint_dir(config.checkpoint_dir)
    if config.seed is None:
        config = replace(config, seed=random.SystemRandom().randrange(2**31))
    return config, ckpt


def _run(
    chosen: algorithms.Algorithm, job: Job, run_dir: str | os.PathLike | RunLog | None
) -> TrainResult:
    """The run itself, once checked (and its checkpoint directory locked), recorded in
    ``run_dir`` if given."""
    runlog = run_dir if isinstance(run_dir, RunLog) or run_dir is None else RunLog(run_dir)
    if runlog is not None:
        runlog.start(job.config)
        job.progress = _both(runlog, job.progress)
    try:
        result = chosen.run(job)
    except BaseException as exc:
        if runlog is not None:
            runlog.close("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    if runlog is not None:
        final = result.history.eval[-1] if job.evaluator is not None else None
        runlog.finish(result.stats, final)
    return result


def _given(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings passed with a value other than ``train()``'s default."""
    defaults = {p.name: p.default for p in inspect.signature(train).parameters.values()}
    return {k: v for k, v in settings.items() if not _is_default(v, defaults[k])}


def _is_default(value: Any, default: Any) -> bool:
    # Compared only with a value of the default's own type: ``==`` on anything else (an
    # array, a tensor) need not answer a bool.
    return value is default or (type(value) is type(default) and value == default)


def _both(
    first: Callable[[ProgressReport], None], second: Callable[[ProgressReport], None] | None
) -> Callable[[ProgressReport], None]:
    """One progress callback calling ``first`` then ``second`` (if any)."""
    if second is None:
        return first

    def both(report: ProgressReport) -> None:
        first(report)
        second(report)

    return both
