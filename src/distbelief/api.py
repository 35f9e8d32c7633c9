"""The public entry point: ``distbelief.train`` runs Downpour SGD and returns the result."""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .actors import DataShard, DownpourMaster, ParameterShard, Stage
from .config import DownpourConfig
from .data import as_tensors, replica_ranges
from .errors import ConfigError, TrainingInterrupted
from .flat import flatten, load_flat, parameters_of
from .layout import Layout
from .messages import (
    Begin,
    BufferSnapshot,
    ConnectDataShard,
    ConnectMaster,
    ConnectStage,
    ProgressReport,
    ShardSnapshot,
    Snapshot,
    StageBuffers,
    TrainingDone,
)
from .partition import as_layers, layer_sizes, model_dtype, resolve_split_points, split_layers
from .runlog import RunLog
from .runtime import make_runtime

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], float]

LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


@dataclass
class History:
    """What happened during a run."""

    train: list[dict[str, float]] = field(default_factory=list)
    """Training loss points: ``{"examples", "wall_s", "loss"}`` (mean loss since the last)."""
    eval: list[dict[str, float]] = field(default_factory=list)
    """Evaluation points on eval data: ``{"examples", "wall_s", "loss", "accuracy"?}``."""

    @property
    def final_loss(self) -> float | None:
        """The last training loss point."""
        return self.train[-1]["loss"] if self.train else None

    @property
    def accuracy(self) -> float | None:
        """The last evaluation accuracy, if eval data and an accuracy metric were given."""
        return self.eval[-1].get("accuracy") if self.eval else None


@dataclass
class TrainResult:
    """The outcome of :func:`train`."""

    model: nn.Sequential
    """A new module with the shards' final parameters (and replica 0's buffers)."""
    history: History
    """Loss curve and evaluation points."""
    stats: dict[str, Any]
    """Counters: updates applied per shard, staleness mean/max, rejected pushes, timings."""
    config: DownpourConfig
    """The configuration the run used, with the seed that was drawn if none was given."""


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


def _dry_run(layers: list[nn.Module], stage_of: list[int], x: torch.Tensor) -> torch.Tensor:
    """Forward a few examples through every layer; name the layer whose input does not fit."""
    modes = [layer.training for layer in layers]
    out = x
    try:
        with torch.no_grad():
            for i, layer in enumerate(layers):
                layer.eval()  # eval mode: a batch of one is fine and no buffer changes
                try:
                    out = layer(out)
                except Exception as exc:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
                    where = (
                        "the training inputs"
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
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"{name}: label {bad} is out of range for cross_entropy over the model's "
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
        data: tuple[torch.Tensor, torch.Tensor],
        loss_fn: LossFn,
        metric: Metric | None,
        batch_size: int = 4096,
    ) -> None:
        self.stage_lengths = [len(group) for group in stage_layers]
        layers = [layer for group in stage_layers for layer in group]
        self.model = nn.Sequential(*copy.deepcopy(layers)).eval()
        self.x, self.y = data
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

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of a whole model, buffers included."""
        mode = model.training
        model.eval()
        with torch.no_grad():
            outs = [
                model(self.x[i : i + self.batch_size])
                for i in range(0, len(self.x), self.batch_size)
            ]
            out = torch.cat(outs)
            metrics = {"loss": float(self.loss_fn(out, self.y))}
            if self.metric is not None:
                metrics["accuracy"] = float(self.metric(out, self.y))
        model.train(mode)
        return metrics


def train(
    model: nn.Module | Sequence[nn.Module],
    train_data: Any,
    *,
    loss: str | LossFn,
    lr: float,
    batch_size: int,
    epochs: int,
    stages: int | Sequence[int] = 1,
    replicas: int = 1,
    shards: int = 1,
    optimizer: str = "sgd",
    n_fetch: int = 1,
    n_push: int = 1,
    warmstart_steps: int = 0,
    eval_data: Any = None,
    seed: int | None = None,
    runtime: str = "local",
    local_lr: float = 0.0,
    eval_every: int = 0,
    metric: Metric | None = None,
    timeout_s: float = 3600.0,
    runtime_options: dict[str, Any] | None = None,
    progress: Callable[[ProgressReport], None] | None = None,
    run_dir: str | os.PathLike | RunLog | None = None,
) -> TrainResult:
    """Train ``model`` with Downpour SGD: ``replicas`` asynchronous model replicas, each split
    into ``stages`` by layer, over a parameter server of ``shards`` shards.

    ``model`` is an ``nn.Sequential`` (or a list of modules); its current parameters are the
    initial ones and it is not modified. ``train_data``/``eval_data`` are ``(X, y)`` tensors or
    a torch ``Dataset``. ``loss`` is ``"cross_entropy"``, ``"mse"`` or a callable
    ``(output, target) -> scalar``. Every input is checked before any actor starts; a bad one
    raises :class:`ConfigError` naming the parameter. See ``DownpourConfig`` for the rest.
    ``run_dir`` (a path, or a :class:`RunLog`): write ``metrics.jsonl``, ``config.toml`` and
    TensorBoard event files there (see ``runlog``); None (default) writes nothing.
    """
    config = DownpourConfig(
        lr=lr,
        batch_size=batch_size,
        epochs=epochs,
        stages=tuple(stages) if isinstance(stages, (list, tuple)) else stages,
        replicas=replicas,
        shards=shards,
        optimizer=optimizer,
        n_fetch=n_fetch,
        n_push=n_push,
        warmstart_steps=warmstart_steps,
        local_lr=local_lr,
        runtime=runtime,
        seed=seed,
        runtime_options=dict(runtime_options or {}),
        eval_every=eval_every,
        timeout_s=timeout_s,
    )
    if config.seed is None:
        config = _with_seed(config, random.SystemRandom().randrange(2**31))
    layers = as_layers(model)
    dtype = model_dtype(layers)
    loss_fn = _resolve_loss(loss)
    x, y = _prepare(*as_tensors(train_data, "train_data"), dtype, loss)
    if config.replicas > len(x):
        raise ConfigError(
            f"replicas: {config.replicas} replicas but only {len(x)} training examples"
        )
    sizes = layer_sizes(layers)
    points = resolve_split_points(sizes, config.stages)
    stage_layers = split_layers(layers, points)
    stage_of = [s for s, group in enumerate(stage_layers) for _ in group]
    total = sum(sizes)
    if config.shards > total:
        raise ConfigError(f"shards: {config.shards} shards but the model has {total} parameters")
    if total and not any(p.requires_grad for p in parameters_of(layers)):
        raise ConfigError("model: no parameter requires grad, so there is nothing to train")
    # Two examples, not one: a custom loss that forgets to reduce over the batch shows up.
    out = _dry_run(layers, stage_of, x[:2])
    _check_targets("train_data", out, y, loss, loss_fn)
    evaluator = None
    if eval_data is not None:
        ex, ey = _prepare(*as_tensors(eval_data, "eval_data"), dtype, loss)
        _check_targets("eval_data", _dry_run(layers, stage_of, ex[:2]), ey, loss, loss_fn)
        metric = metric or default_metric(loss, ey)
        evaluator = Evaluator(stage_layers, (ex, ey), loss_fn, metric)
    runlog = run_dir if isinstance(run_dir, RunLog) or run_dir is None else RunLog(run_dir)
    if runlog is not None:
        runlog.start(config)
        progress = _both(runlog, progress)

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            done, runtime_stats = _run(
                config, layers, stage_layers, dtype, loss_fn, x, y, evaluator, progress
            )
    except BaseException as exc:
        if runlog is not None:
            runlog.close("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise

    result_model = _assemble(stage_layers, done.weights, done.buffers)
    stats = {**_stats(done, config), **runtime_stats}
    history = History(train=done.history["train"], eval=done.history["eval"])
    final = None
    if evaluator is not None:
        final = {"examples": done.examples, "wall_s": done.train_s}
        final.update(evaluator.evaluate(result_model))
        history.eval.append(final)
    if runlog is not None:
        runlog.finish(stats, final)
    return TrainResult(result_model, history, stats, config)


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


def _with_seed(config: DownpourConfig, seed: int) -> DownpourConfig:
    from dataclasses import replace

    return replace(config, seed=seed)


def _run(
    config: DownpourConfig,
    layers: list[nn.Module],
    stage_layers: list[list[nn.Module]],
    dtype: torch.dtype,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    evaluator: Evaluator | None,
    progress: Callable[[ProgressReport], None] | None,
) -> tuple[TrainingDone, dict[str, Any]]:
    """Spawn and wire every actor, run until the master reports, always shut down. Returns the
    master's report and what the runtime says of the run (its ``describe()``, if it has one)."""
    initial = flatten(layers).to(dtype)
    tensor_sizes = [[p.numel() for p in parameters_of(group)] for group in stage_layers]
    layout = Layout.build(
        [sum(sizes) for sizes in tensor_sizes],
        config.shards,
        [n for sizes in tensor_sizes for n in sizes],
    )
    rt = make_runtime(config.runtime, seed=config.seed, **config.runtime_options)
    try:
        shard_refs = tuple(
            rt.spawn(
                f"shard{k}",
                ParameterShard,
                k,
                initial[a:b],
                a,
                layout.segments_of_shard(k),
                config.optimizer,
                config.lr,
            )
            for k, (a, b) in enumerate(layout.shard_ranges)
        )
        n_stages = len(stage_layers)
        ranges = replica_ranges(len(x), config.replicas)
        steps_per_epoch = -(-(ranges[0][1] - ranges[0][0]) // config.batch_size)
        report_every = max(1, min(50, steps_per_epoch * config.epochs // 20))
        data_refs, stage_refs = [], []
        for r, (lo, hi) in enumerate(ranges):
            data_refs.append(
                rt.spawn(
                    f"data{r}",
                    DataShard,
                    r,
                    x[lo:hi],
                    y[lo:hi],
                    config.batch_size,
                    config.epochs,
                    config.seed,
                    report_every,
                )
            )
            stage_refs.append(
                [
                    rt.spawn(
                        f"replica{r}.stage{s}",
                        Stage,
                        r,
                        s,
                        copy.deepcopy(stage_layers[s]),
                        layout.segments_of_stage(s),
                        layout.stage_ranges[s][0],
                        loss_fn if s == n_stages - 1 else None,
                        config.n_fetch,
                        config.n_push,
                        config.local_lr,
                    )
                    for s in range(n_stages)
                ]
            )
        total_examples = len(x) * config.epochs
        master = rt.spawn(
            "master",
            DownpourMaster,
            config.replicas,
            config.warmstart_steps,
            total_examples,
            evaluator,
            config.eval_every,
            max(1, total_examples // 100),
            rt.single_threaded,
        )
        # Replica 0's stages with buffers: an evaluation during training asks them for theirs.
        buffer_stages = tuple(
            stage_refs[0][s]
            for s, group in enumerate(stage_layers)
            if evaluator is not None and any(True for g in group for _ in g.buffers())
        )
        rt.tell(master, ConnectMaster(tuple(data_refs), shard_refs, buffer_stages))
        for r in range(config.replicas):
            refs = stage_refs[r]
            rt.tell(data_refs[r], ConnectDataShard(tuple(refs), master))
            for s, ref in enumerate(refs):
                rt.tell(
                    ref,
                    ConnectStage(
                        refs[s - 1] if s > 0 else None,
                        refs[s + 1] if s + 1 < n_stages else None,
                        shard_refs,
                        data_refs[r],
                    ),
                )
        try:
            for reply in rt.converse(master, Begin(), timeout=config.timeout_s):
                if isinstance(reply, TrainingDone):
                    # A runtime may describe the run too (Ray: the node each actor ran on).
                    describe = getattr(rt, "describe", None)
                    return reply, (describe() if describe is not None else {})
                if progress is not None and isinstance(reply, ProgressReport):
                    progress(reply)
        except KeyboardInterrupt:
            # Ctrl-C: the runtimes stop between two messages, so every actor is whole.
            weights, buffers = _collect_trained(rt, shard_refs, stage_refs[0])
            raise TrainingInterrupted(_assemble(stage_layers, weights, buffers)) from None
        raise RuntimeError("the runtime stopped without a result")  # pragma: no cover
    finally:
        rt.shutdown()


INTERRUPTED = -2
"""Tag of the snapshots collected after Ctrl-C (the master's are >= 1, and -1 the final)."""


def _collect_trained(
    rt: Any, shard_refs: tuple, stage_refs: list, timeout: float = 60.0
) -> tuple[torch.Tensor, tuple]:
    """The shards' current parameters and replica 0's buffers, asked for by the driver."""

    def ask(ref: Any, request: Any, reply_type: type) -> Any:
        for reply in rt.converse(ref, request, timeout=timeout):
            if isinstance(reply, reply_type) and reply.tag == INTERRUPTED:
                return reply
        raise RuntimeError("the runtime stopped without a reply")  # pragma: no cover

    weights = [ask(s, Snapshot(INTERRUPTED), ShardSnapshot).weights for s in shard_refs]
    buffers = [ask(s, BufferSnapshot(INTERRUPTED), StageBuffers).buffers for s in stage_refs]
    return torch.cat(weights), tuple(buffers)


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


def _stats(done: TrainingDone, config: DownpourConfig) -> dict[str, Any]:
    applied = [int(s["updates_applied"]) for s in done.shard_stats]
    total_applied = sum(applied)
    return {
        "updates_applied": applied,
        "updates_applied_total": total_applied,
        "staleness_mean": sum(s["staleness_sum"] for s in done.shard_stats) / max(total_applied, 1),
        "staleness_max": int(max(s["staleness_max"] for s in done.shard_stats)),
        "staleness_histogram": _sum_histograms(
            [s.get("staleness_histogram", []) for s in done.shard_stats]
        ),
        "rejected_pushes": int(sum(s["rejected_pushes"] for s in done.shard_stats)),
        "examples": done.examples,
        "steps": done.steps,
        "train_s": done.train_s,
        "eval_s": done.eval_s,
        "examples_per_s": done.examples / done.train_s if done.train_s > 0 else float("nan"),
        "seed": config.seed,
        "restarts": done.restarts,
    }


def _sum_histograms(histograms: list[list[int]]) -> list[int]:
    """Entry-wise sum of count lists of different lengths."""
    total = [0] * max((len(h) for h in histograms), default=0)
    for h in histograms:
        for i, c in enumerate(h):
            total[i] += c
    return total
