"""The public entry point: ``distbelief.train`` checks every input, then hands the run to the
algorithm's own module (``downpour.py``); the result types live here."""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms.downpour.config import DownpourConfig
from .algorithms.sandblaster.config import SandblasterConfig
from .core.flat import load_flat, parameters_of
from .core.partition import (
    as_layers,
    edits_its_input,
    layer_sizes,
    model_dtype,
    resolve_split_points,
    split_layers,
)
from .data.formats import FileData, as_file_data
from .data.inputs import TensorRows, as_tensors, check_device, replica_ranges
from .errors import ConfigError, NothingToTrain, TrainingDiverged
from .results import ProgressReport, TrainResult
from .storage.checkpoint import nothing_left
from .storage.dirlock import DirectoryLock
from .storage.runlog import RunLog

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], float]

LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def _resolve_loss(loss: str | LossFn) -> LossFn:
    if isinstance(loss, str):
        try:
            return LOSSES[loss]
        except KeyError:
            raise ConfigError(
                f"loss: unknown loss {loss!r}; choose one of {', '.join(LOSSES)} or pass a callable"
            ) from None
    if not callable(loss):
        raise ConfigError(f"loss: expected a name or a callable, got {type(loss).__name__}")
    return loss


def _prepare(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, loss: str | LossFn) -> tuple:
    """Cast inputs to the model's dtype (float inputs only) and regression targets too."""
    if x.is_floating_point():
        x = x.to(dtype)
    if y.is_floating_point() or loss == "mse":
        y = y.to(dtype)
    return x.contiguous(), y.contiguous()


def _rows(
    data: Any, name: str, dtype: torch.dtype, loss: str | LossFn, like: Any = None
) -> TensorRows | FileData:
    """``train_data``/``eval_data`` as rows: a data file (checked, read later by the data
    shards themselves) or in-memory tensors."""
    files = as_file_data(data, name, dtype, loss, like if isinstance(like, FileData) else None)
    if files is not None:
        return files
    return TensorRows(*_prepare(*as_tensors(data, name), dtype, loss))


def _dry_run(
    layers: list[nn.Module], stage_of: list[int], x: torch.Tensor, name: str = "train_data"
) -> torch.Tensor:
    """Forward a few examples of ``name`` through every layer; name the layer whose input does
    not fit."""
    modes = [layer.training for layer in layers]
    out = x.clone()  # a layer that works in place (ReLU(inplace=True)) must not edit the data
    try:
        with torch.no_grad():
            for i, layer in enumerate(layers):
                layer.eval()  # eval mode: a batch of one is fine and no buffer changes
                try:
                    out = layer(out)
                except Exception as exc:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
                    where = (
                        f"the inputs of {name} (each shaped {tuple(x.shape[1:])})"
                        if i == 0
                        else f"the output of layer {i - 1} (shape {shape})"
                    )
                    raise ConfigError(
                        f"model: layer {i} ({type(layer).__name__}) in stage {stage_of[i]} "
                        f"cannot take {where}: {exc}"
                    ) from None
                if not isinstance(out, torch.Tensor):
                    raise ConfigError(
                        f"model: layer {i} ({type(layer).__name__}) returns "
                        f"{type(out).__name__}; stages pass single tensors"
                    )
    finally:
        for layer, mode in zip(layers, modes):
            layer.train(mode)
    return out


def _check_inputs(
    name: str, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor | None = None
) -> None:
    """What a dry run on two examples cannot see: NaN or Inf anywhere in the data (every push
    of a batch holding one would be rejected, silently), or an index into a first-layer
    Embedding that is out of range (it would fail mid-run, in some replica's step)."""
    for part, values in (("inputs", x), ("targets", y)):
        if values is not None and values.is_floating_point():
            bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                value = values[row].reshape(-1)[~torch.isfinite(values[row].reshape(-1))][0]
                raise ConfigError(
                    f"{name}: row {row} of the {part} holds {float(value)} "
                    f"({int(bad.sum())} rows hold NaN or Inf); clean or drop them"
                )
    first = layers[0]
    if isinstance(first, (nn.Embedding, nn.EmbeddingBag)) and not x.is_floating_point():
        n = first.num_embeddings
        bad = ((x < 0) | (x >= n)).reshape(len(x), -1)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0])
            index = int(x[row].reshape(-1)[bad[row]][0])
            raise ConfigError(
                f"{name}: row {row} holds index {index}, out of range for the first layer, "
                f"{type(first).__name__} of {n} entries (indices must be in 0..{n - 1})"
            )


def _check_lr(config: DownpourConfig, dtype: torch.dtype) -> None:
    """A rate the model's dtype cannot hold would turn every update into inf inside a shard."""
    limit = torch.finfo(dtype).max
    for name in ("lr", "local_lr"):
        value = getattr(config, name)
        if value > limit:
            raise ConfigError(
                f"{name}: {value:g} overflows the model's {str(dtype).removeprefix('torch.')} "
                f"(largest {limit:g})"
            )


def _check_batches(layers: list[nn.Module], examples: int, config: DownpourConfig) -> None:
    """BatchNorm in training mode cannot normalise a mini-batch of one example: refuse a run
    whose epochs would end with one, instead of failing in its last step."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in _modules(layers)):
        return
    for r, (lo, hi) in enumerate(replica_ranges(examples, config.replicas)):
        if (hi - lo) % config.batch_size == 1:
            raise ConfigError(
                f"batch_size: replica {r}'s {hi - lo} examples end each epoch with a "
                f"mini-batch of one, which BatchNorm cannot train on; choose another batch size"
            )


STATE_COPIES = {"sgd": 0, "momentum": 1, "adagrad": 1, "adam": 2}
"""Parameter-sized tensors of optimizer state per parameter, by update rule."""


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(
    total: int, dtype: torch.dtype, config: DownpourConfig | SandblasterConfig
) -> None:
    """Refuse a run whose parameter copies cannot fit in this machine's memory (in-process:
    every replica's copy, the shards' values and optimizer state, and the initial vector),
    instead of failing in an allocation half-way through spawning actors."""
    if config.runtime != "local":
        return  # the copies are spread over processes or nodes with memory of their own
    if isinstance(config, SandblasterConfig):  # the shards' vectors: x, g, d, w, ..., history
        state, what = 2 * config.history + 8, "L-BFGS's vectors"
    else:
        state, what = STATE_COPIES.get(config.optimizer, 2), f"{config.optimizer}'s state"
    copies = config.replicas + 2 + state
    need = total * dtype.itemsize * copies
    free = available_memory()
    if free is not None and need > free:
        raise ConfigError(
            f"model: {total:,} parameters need about {need / 2**30:.1f} GiB for "
            f"{config.replicas} replicas, the shards and {what}, more than "
            f"the {free / 2**30:.1f} GiB of memory available"
        )


def _modules(layers: list[nn.Module]) -> list[nn.Module]:
    return [m for layer in layers for m in layer.modules()]


def _check_targets(
    name: str, out: torch.Tensor, y: torch.Tensor, loss: str | LossFn, loss_fn: LossFn
) -> None:
    """Targets must suit the loss: integer labels in range for cross-entropy, matching shapes
    for mse, and any callable must return a scalar on one example."""
    if loss == "cross_entropy":
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ConfigError(f"{name}: cross_entropy needs integer class labels, got {y.dtype}")
        classes = out.shape[1] if out.dim() > 1 else out.shape[0]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            wrong = (y < 0) | (y >= classes)
            row = int(wrong.reshape(len(y), -1).any(1).nonzero()[0, 0])  # the first bad row
            bad = int(y[row].reshape(-1)[wrong[row].reshape(-1)][0])
            raise ConfigError(
                f"{name}: row {row}: label {bad} is out of range for cross_entropy over the "
                "model's "
                f"{classes} outputs (labels must be in 0..{classes - 1})"
            )
    elif loss == "mse" and tuple(out.shape[1:]) != tuple(y.shape[1:]):
        raise ConfigError(
            f"{name}: mse needs targets shaped like the output, {tuple(out.shape[1:])} per "
            f"example, got {tuple(y.shape[1:])}"
        )
    try:
        value = loss_fn(out, y[: len(out)])
    except Exception as exc:
        raise ConfigError(f"loss: fails on the model's output and the targets: {exc}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ConfigError("loss: must return a scalar tensor")


def default_metric(loss: str | LossFn, y: torch.Tensor) -> Metric | None:
    """Accuracy for the built-in losses: argmax for cross-entropy; for mse on 0/1 targets, the
    fraction of examples whose every output is on the right side of 0.5."""
    if loss == "cross_entropy":
        return lambda out, t: float((out.argmax(dim=1) == t).float().mean())
    if loss == "mse" and bool(((y == 0) | (y == 1)).all()):
        return lambda out, t: float(((out > 0.5) == (t > 0.5)).flatten(1).all(1).float().mean())
    return None


class Evaluator:
    """Loss (and accuracy) of a flat parameter vector and replica 0's buffers on held-out data."""

    def __init__(
        self,
        stage_layers: list[list[nn.Module]],
        data: tuple[torch.Tensor, torch.Tensor] | FileData,
        loss_fn: LossFn,
        metric: Metric | None,
        batch_size: int = 4096,
    ) -> None:
        self.stage_lengths = [len(group) for group in stage_layers]
        layers = [layer for group in stage_layers for layer in group]
        self.model = nn.Sequential(*copy.deepcopy(layers)).eval()
        # A file is read a chunk at a time at each evaluation, never held whole.
        self.file = data if isinstance(data, FileData) else None
        self.x, self.y = (None, None) if self.file is not None else data
        self.loss_fn = loss_fn
        self.metric = metric
        self.batch_size = batch_size

    def __call__(
        self, weights: torch.Tensor, buffers: dict[int, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, float]:
        """Metrics of the flat parameters with each stage's buffers (by stage index; a stage
        not given keeps the buffers it had)."""
        load_flat(self.model.children(), weights)
        if buffers:
            stages = range(len(self.stage_lengths))
            _load_buffers(self.model, self.stage_lengths, tuple(buffers.get(s) for s in stages))
        return self.evaluate(self.model)

    def evaluate_final(
        self, model: nn.Module, examples: int, wall_s: float, stats: dict[str, Any]
    ) -> dict[str, float]:
        """The final evaluation as a history point (``examples``, ``wall_s`` and the metrics).
        A loss that is not finite raises ``TrainingDiverged``, which keeps ``model``."""
        final = self.evaluate(model)
        if not math.isfinite(final["loss"]):
            loss = final["loss"]
            raise TrainingDiverged(f"the final evaluation loss is {loss}", model, stats)
        return {"examples": examples, "wall_s": wall_s, **final}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of a whole model, buffers included."""
        mode = model.training
        model.eval()
        if self.file is not None:
            metrics = self._evaluate_file(model, self.file)
            model.train(mode)
            return metrics
        copy = edits_its_input(list(model.children()))  # the held-out data stays as it is
        with torch.no_grad():
            batches = self.x.split(self.batch_size)
            out = torch.cat([model(b.clone() if copy else b) for b in batches])
            metrics = {"loss": float(self.loss_fn(out, self.y))}
            if self.metric is not None:
                metrics["accuracy"] = float(self.metric(out, self.y))
        model.train(mode)
        return metrics

    def _evaluate_file(self, model: nn.Module, data: FileData) -> dict[str, float]:
        """Chunk by chunk: loss and accuracy are means over chunks weighted by their size (the
        exact mean for a loss that averages over examples)."""
        sums = {"loss": 0.0, "accuracy": 0.0}
        with torch.no_grad():
            for x, y in data.chunks(self.batch_size):
                out = model(x)  # a fresh tensor per chunk: a layer may edit it in place
                sums["loss"] += float(self.loss_fn(out, y)) * len(x)
                if self.metric is not None:
                    sums["accuracy"] += float(self.metric(out, y)) * len(x)
        keys = ("loss", "accuracy") if self.metric is not None else ("loss",)
        return {k: sums[k] / len(data) for k in keys}


ALGORITHMS = ("downpour", "sandblaster")
"""The paper's two algorithms."""

DOWNPOUR_ONLY = ("lr", "epochs", "optimizer", "n_fetch", "n_push", "warmstart_steps", "local_lr")
SANDBLASTER_ONLY = ("steps", "history", "portions")


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
    runtime: str = "local",
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
    """
    given = dict(lr=lr, epochs=epochs, optimizer=optimizer, n_fetch=n_fetch, n_push=n_push,
                 warmstart_steps=warmstart_steps, local_lr=local_lr, steps=steps,
                 history=history, portions=portions)  # fmt: skip
    if algorithm not in ALGORITHMS:
        raise ConfigError(
            f"algorithm: unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
        )
    other = SANDBLASTER_ONLY if algorithm == "downpour" else DOWNPOUR_ONLY
    for name in other:
        if given[name] is not None:
            raise ConfigError(f"{name}: a {_other(algorithm)} option; {algorithm} does not take it")
    config: DownpourConfig | SandblasterConfig
    ckpt = None
    if algorithm == "sandblaster":
        if checkpoint_dir is None and run_dir is not None:
            root = run_dir.path if isinstance(run_dir, RunLog) else run_dir
            checkpoint_dir = os.path.join(root, "checkpoints")
        if stages != 1:
            raise ConfigError("stages: Sandblaster's replicas are not split into stages (use 1)")
        if eval_every:
            raise ConfigError("eval_every: Sandblaster evaluates at the end only")
        options = {k: v for k, v in given.items() if k in SANDBLASTER_ONLY and v is not None}
        config = SandblasterConfig(
            **options, batch_size=batch_size, replicas=replicas, shards=shards, seed=seed,
            runtime=runtime, runtime_options=dict(runtime_options or {}), timeout_s=timeout_s,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every or 0, resume=resume,
        )  # fmt: skip
        if resume is not None and seed is None:  # the batches' order comes from the checkpoint
            from .storage.checkpoint import load

            config = replace(config, seed=load(resume).manifest["config"].get("seed"))
        _check_checkpoint_dir(config.checkpoint_dir)
    else:
        for name, v in (("lr", lr), ("batch_size", batch_size), ("epochs", epochs)):
            if v is None:
                raise ConfigError(f"{name}: Downpour needs it (e.g. {name}={_EXAMPLE[name]})")
        options = {k: v for k, v in given.items() if k in DOWNPOUR_ONLY and v is not None}
        if checkpoint_dir is None and run_dir is not None:
            root = run_dir.path if isinstance(run_dir, RunLog) else run_dir
            checkpoint_dir = os.path.join(root, "checkpoints")
        if resume is not None and seed is None:
            # The data order is a function of the seed: it comes from the checkpoint.
            from .storage.checkpoint import load

            if not isinstance(resume, (str, os.PathLike)):
                raise ConfigError(f"resume: expected a directory path, got {resume!r}")
            ckpt = load(resume)
            seed = ckpt.manifest["config"].get("seed")
        config = DownpourConfig(
            **options,
            batch_size=batch_size,
            stages=tuple(stages) if isinstance(stages, (list, tuple)) else stages,
            replicas=replicas,
            shards=shards,
            runtime=runtime,
            seed=seed,
            runtime_options=dict(runtime_options or {}),
            eval_every=eval_every,
            timeout_s=timeout_s,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every or 0,
            resume=resume,
        )
        _check_checkpoint_dir(config.checkpoint_dir)
    if config.seed is None:
        config = _with_seed(config, random.SystemRandom().randrange(2**31))
    layers = as_layers(model)
    for i, layer in enumerate(layers):
        for pname, values in (*layer.named_parameters(), *layer.named_buffers()):
            check_device(values.data, f"model: layer {i} ({type(layer).__name__}) {pname} is")
    dtype = model_dtype(layers)
    loss_fn = _resolve_loss(loss)
    rows = _rows(train_data, "train_data", dtype, loss)
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
    _check_memory(total, dtype, config)
    if total and not any(p.requires_grad for p in parameters_of(layers)):
        raise ConfigError("model: no parameter requires grad, so there is nothing to train")
    _check_inputs("train_data", layers, x, y)  # a file's every row: checked when scanned
    if isinstance(config, DownpourConfig):
        _check_lr(config, dtype)
        _check_batches(layers, len(rows), config)
        if checkpoint_every is None and config.checkpoint_dir is not None:
            config = replace(config, checkpoint_every=epoch_steps(len(rows), config))
    elif not isinstance(rows, TensorRows):
        raise ConfigError("train_data: Sandblaster takes in-memory data, not a file")
    elif checkpoint_every is None and config.checkpoint_dir is not None:
        # every epoch by default, as Downpour: a step is an epoch with the whole batch
        each = max(1, len(rows) // (config.batch_size or len(rows)))
        config = replace(config, checkpoint_every=each)
    # Two examples, not one: a custom loss that forgets to reduce over the batch shows up.
    out = _dry_run(layers, stage_of, x[:2])
    _check_targets("train_data", out, y, loss, loss_fn)
    evaluator = None
    if eval_data is not None:
        eval_rows = _rows(eval_data, "eval_data", dtype, loss, like=rows)
        ex, ey = eval_rows.probe()  # in-memory data: all of it
        _check_inputs("eval_data", layers, ex, ey)
        _check_targets(
            "eval_data", _dry_run(layers, stage_of, ex[:2], "eval_data"), ey, loss, loss_fn
        )
        metric = metric or default_metric(loss, ey)
        data = (ex, ey) if isinstance(eval_rows, TensorRows) else eval_rows
        evaluator = Evaluator(stage_layers, data, loss_fn, metric)
    if isinstance(config, SandblasterConfig) and config.resume is not None:
        from .algorithms.sandblaster.driver import prepare_resume as prepare_sandblaster

        ckpt = prepare_sandblaster(config, layers, len(rows))
    if isinstance(config, DownpourConfig) and config.resume is not None:
        from .algorithms.downpour.driver import prepare_resume

        ckpt = prepare_resume(config, stage_layers, len(rows), ckpt)
        left = nothing_left(ckpt, config.epochs, len(rows))
        if left is not None:  # before anything is written: the checkpoint stays as it is
            raise NothingToTrain(f"epochs: {left}; give more epochs to train on")
    # One run at a time per checkpoint directory: a second one would remove the first's
    # checkpoints. Taken after every check, before anything is written.
    lock = None
    if getattr(config, "checkpoint_dir", None) is not None:
        lock = DirectoryLock(config.checkpoint_dir, "checkpoint_dir").acquire()
    try:
        return _train_locked(config, layers, stage_layers, dtype, loss_fn, rows, evaluator,
                             progress, ckpt, checkpoint_meta, x, y, run_dir)  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def _train_locked(
    config: DownpourConfig | SandblasterConfig,
    layers: list[nn.Module],
    stage_layers: list[list[nn.Module]],
    dtype: torch.dtype,
    loss_fn: LossFn,
    rows: TensorRows | FileData,
    evaluator: Evaluator | None,
    progress: Callable[[ProgressReport], None] | None,
    ckpt: Any,
    checkpoint_meta: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    run_dir: str | os.PathLike | RunLog | None,
) -> TrainResult:
    """The run itself, once checked (and its checkpoint directory locked)."""
    runlog = run_dir if isinstance(run_dir, RunLog) or run_dir is None else RunLog(run_dir)
    if runlog is not None:
        runlog.start(config)
        progress = _both(runlog, progress)
    try:
        # Imported here: the algorithms' modules build on this module's result types.
        if isinstance(config, SandblasterConfig):
            from .algorithms.sandblaster.driver import run as run_sandblaster

            result = run_sandblaster(config, layers, dtype, loss_fn, x, y, evaluator, progress,
                                     ckpt, checkpoint_meta)  # fmt: skip
        else:
            from .algorithms.downpour.driver import run

            result = run(config, layers, stage_layers, dtype, loss_fn, rows, evaluator, progress,
                         ckpt, checkpoint_meta)  # fmt: skip
    except BaseException as exc:
        if runlog is not None:
            runlog.close("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    if runlog is not None:
        final = result.history.eval[-1] if evaluator is not None else None
        runlog.finish(result.stats, final)
    return result


def epoch_steps(examples: int, config: DownpourConfig) -> int:
    """Steps (mini-batches over all replicas) of one epoch: the default checkpoint period."""
    ranges = replica_ranges(examples, config.replicas)
    return sum(-(-(hi - lo) // config.batch_size) for lo, hi in ranges)


def _check_checkpoint_dir(path: str | None) -> None:
    """A checkpoint directory must be one we can write into (made if missing)."""
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"checkpoint_dir: cannot use {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"checkpoint_dir: {path} is not writable")


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


_EXAMPLE = {"lr": 0.05, "batch_size": 32, "epochs": 5}


def _other(algorithm: str) -> str:
    return "Sandblaster" if algorithm == "downpour" else "Downpour"


def _with_seed(config: Any, seed: int) -> Any:
    from dataclasses import replace

    return replace(config, seed=seed)


def _assemble(
    stage_layers: list[list[nn.Module]], weights: torch.Tensor, buffers: tuple
) -> nn.Sequential:
    """A new model: the layers with these flat parameters and per-stage buffers."""
    model = nn.Sequential(*copy.deepcopy([layer for group in stage_layers for layer in group]))
    load_flat(model.children(), weights)
    _load_buffers(model, [len(group) for group in stage_layers], buffers)
    return model


def _load_buffers(model: nn.Sequential, stage_lengths: list[int], buffers: tuple) -> None:
    """Load per-stage module buffers (replica 0's: e.g. BatchNorm statistics, which the PS
    does not hold) into the whole model; ``stage_lengths`` are the stages' layer counts."""
    offset = 0
    for length, stage_buffers in zip(stage_lengths, buffers, strict=True):
        if stage_buffers:
            stage_model = nn.Sequential(*[model[offset + i] for i in range(length)])
            stage_model.load_state_dict(stage_buffers, strict=False)
        offset += length
