"""Wiring a Downpour SGD run: spawn the shards, data shards, stages and the master, run until
the master reports, and build the result. ``api.train`` checks the inputs and hands over here."""

from __future__ import annotations

import copy
import dataclasses
import logging
import signal
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ...api import Evaluator, LossFn, _assemble
from ...core.flat import flatten, parameters_of
from ...core.layout import Layout
from ...data.formats import DataFileChanged, FileData
from ...data.inputs import TensorRows, replica_ranges
from ...errors import ActorFailed, ConfigError, DataChanged, TrainingDiverged, TrainingInterrupted
from ...results import History, ProgressReport, TrainResult
from ...runtime import faults, make_runtime
from ...storage.checkpoint import (
    Checkpoint,
    Checkpointer,
    check_compatible,
    describe_parameters,
    load,
    remove_partial,
    updates_lost,
)
from ..messages import Begin
from .config import DownpourConfig
from .data_shard import DataShard
from .master import DownpourMaster
from .messages import (
    BufferSnapshot,
    ConnectDataShard,
    ConnectMaster,
    ConnectStage,
    DataUnreadable,
    Diverged,
    ShardSnapshot,
    Snapshot,
    StageBuffers,
    TrainingDone,
)
from .parameter_shard import ParameterShard
from .stage import Stage

log = logging.getLogger("distbelief")


def build_layout(stage_layers: list[list[nn.Module]], shards: int) -> Layout:
    """The flat parameter space of these stages over ``shards`` shards."""
    tensor_sizes = [[p.numel() for p in parameters_of(group)] for group in stage_layers]
    return Layout.build(
        [sum(sizes) for sizes in tensor_sizes], shards, [n for sizes in tensor_sizes for n in sizes]
    )


MUST_AGREE = ("batch_size", "optimizer", "lr", "seed")
"""Settings a resumed run must share with its checkpoint: the data positions count
mini-batches of that size in the seed's order, and the update rules' state is of that rule
(with that rate: torch's state_dict carries it). Replicas, shards and stages are checked too."""


def checkpoint_config(config: DownpourConfig, train_examples: int, meta: Any) -> dict[str, Any]:
    """What a checkpoint's manifest records of the run (JSON): the config's settings (not
    the runtime's options nor where checkpoints go), the training set's size and ``meta``."""
    settings = dataclasses.asdict(config)
    for key in ("runtime_options", "checkpoint_dir", "resume"):
        settings.pop(key)
    return {**settings, "train_examples": train_examples, "meta": meta}


def prepare_resume(
    config: DownpourConfig,
    stage_layers: list[list[nn.Module]],
    train_examples: int,
    ckpt: Checkpoint | None = None,
) -> Checkpoint:
    """Load and verify ``config.resume`` (unless ``ckpt``, loaded already) and check that this
    run can carry on from it; a ``ConfigError`` (``CheckpointError``) names the file or the
    setting that differs."""
    ckpt = ckpt if ckpt is not None else load(config.resume)
    where = ckpt.path / "manifest.json"
    saved = ckpt.manifest["config"]
    if saved.get("algorithm") == "sandblaster":
        raise ConfigError(
            f"resume: {where} is a Sandblaster checkpoint; resume it with algorithm='sandblaster'"
        )
    layers = [layer for group in stage_layers for layer in group]
    check_compatible(ckpt, describe_parameters(layers), build_layout(stage_layers, config.shards))
    if len(ckpt.positions) != config.replicas:
        raise ConfigError(
            f"replicas: {where} was taken with {len(ckpt.positions)} replicas, this run has "
            f"{config.replicas}; resume with the same replicas (their data positions are not "
            "re-sliced)"
        )
    for name in MUST_AGREE:
        if name in saved and saved[name] != getattr(config, name):
            raise ConfigError(
                f"{name}: {where} was taken with {name} {saved[name]!r}, this run has "
                f"{getattr(config, name)!r}; resume with the same {name}"
            )
    if saved.get("train_examples", train_examples) != train_examples:
        raise ConfigError(
            f"train_data: {where} was taken on {saved['train_examples']} training examples, "
            f"this run has {train_examples}; resume on the same data"
        )
    return ckpt


def run(
    config: DownpourConfig,
    layers: list[nn.Module],
    stage_layers: list[list[nn.Module]],
    dtype: torch.dtype,
    loss_fn: LossFn,
    rows: TensorRows | FileData,
    evaluator: Evaluator | None,
    progress: Callable[[ProgressReport], None] | None,
    resume: Checkpoint | None = None,
    checkpoint_meta: Any = None,
) -> TrainResult:
    """Run Downpour SGD with a checked ``config`` and return the result; from ``resume``
    (checked by :func:`prepare_resume`) if given."""
    lost = updates_lost(resume) if resume is not None else None  # before this run's reports
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        done, runtime_stats = _run(
            config, layers, stage_layers, dtype, loss_fn, rows, evaluator, progress, resume,
            checkpoint_meta,
        )  # fmt: skip

    result_model = _assemble(stage_layers, done.weights, done.buffers)
    stats = {**_stats(done, config, resume, lost), **runtime_stats}
    history = History(train=done.history["train"], eval=done.history["eval"])
    # A run that learned nothing is never returned as a result (see TrainingDiverged).
    if not bool(torch.isfinite(done.weights).all()):
        raise TrainingDiverged("the final parameters hold NaN or Inf", None, stats)
    rejected, applied = stats["rejected_pushes"], stats["updates_applied_total"]
    if rejected > applied:
        raise TrainingDiverged(
            f"{rejected:,} of {rejected + applied:,} pushes held NaN or Inf and were rejected",
            result_model,
            stats,
        )
    if rejected:
        log.warning(
            "%d of %d pushes held NaN or Inf and were rejected", rejected, rejected + applied
        )
    if evaluator is not None:
        history.eval.append(
            evaluator.evaluate_final(result_model, done.examples, done.train_s, stats)
        )
    return TrainResult(result_model, history, stats, config)


def _run(
    config: DownpourConfig,
    layers: list[nn.Module],
    stage_layers: list[list[nn.Module]],
    dtype: torch.dtype,
    loss_fn: LossFn,
    rows: TensorRows | FileData,
    evaluator: Evaluator | None,
    progress: Callable[[ProgressReport], None] | None,
    resume: Checkpoint | None = None,
    checkpoint_meta: Any = None,
) -> tuple[TrainingDone, dict[str, Any]]:
    """Spawn and wire every actor, run until the master reports, always shut down. Returns the
    master's report and what the runtime says of the run (its ``describe()``, if it has one)."""
    initial = flatten(layers).to(dtype)
    layout = build_layout(stage_layers, config.shards)
    positions: Mapping[int, Mapping[str, int]] = resume.positions if resume is not None else {}
    checkpointer = None
    if config.checkpoint_dir is not None:
        remove_partial(config.checkpoint_dir)  # a write the last run's crash cut off
        checkpointer = Checkpointer(
            config.checkpoint_dir,
            layout=layout,
            parameters=describe_parameters(layers),
            config=checkpoint_config(config, len(rows), checkpoint_meta),
        )
    # A planned fault whose count this run never reaches is refused before anything starts.
    plan = faults.plan(config.runtime_options.get("faults"))
    if plan:
        faults.check_reachable(plan, most_counts(config, layout, len(rows), len(stage_layers)))
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
                state=resume.shards[k] if resume is not None else None,
            )
            for k, (a, b) in enumerate(layout.shard_ranges)
        )
        n_stages = len(stage_layers)
        ranges = replica_ranges(len(rows), config.replicas)
        steps_per_epoch = -(-(ranges[0][1] - ranges[0][0]) // config.batch_size)
        report_every = max(1, min(50, steps_per_epoch * config.epochs // 20))
        data_refs, stage_refs = [], []
        for r, (lo, hi) in enumerate(ranges):
            data_refs.append(
                rt.spawn(
                    f"data{r}",
                    DataShard,
                    r,
                    rows.part(lo, hi),  # a file's part is read by the data shard itself
                    config.batch_size,
                    config.epochs,
                    config.seed,
                    report_every,
                    n_push=config.n_push,
                    start=positions.get(r),
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
        total_examples = len(rows) * config.epochs
        warmstart = config.warmstart_steps
        if positions and positions[0]["steps"] >= warmstart:
            warmstart = 0  # replica 0 was past its warmstart when the checkpoint was taken
        resumed = {
            "examples": sum(int(p["examples"]) for p in positions.values()),
            "steps": sum(int(p["steps"]) for p in positions.values()),
        }
        master = rt.spawn(
            "master",
            DownpourMaster,
            config.replicas,
            warmstart,
            total_examples,
            evaluator,
            config.eval_every,
            max(1, total_examples // 100),
            rt.single_threaded,
            checkpoint_dir=config.checkpoint_dir,
            checkpointer=checkpointer,
            checkpoint_every=config.checkpoint_every,
            resumed=resumed,
            # one mark per (replica, stage, shard) segment
            checkpoint_marks=config.replicas
            * sum(len(layout.segments_of_stage(s)) for s in range(n_stages)),
        )
        # Replica 0's stages with buffers: an evaluation during training asks them for theirs.
        buffer_stages = tuple(
            stage_refs[0][s]
            for s, group in enumerate(stage_layers)
            if evaluator is not None and any(True for g in group for _ in g.buffers())
        )
        rt.tell(
            master,
            ConnectMaster(
                tuple(data_refs), shard_refs, buffer_stages, tuple(map(tuple, stage_refs))
            ),
        )
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
                if isinstance(reply, DataUnreadable):
                    weights, buffers = _collect_trained(rt, shard_refs, stage_refs[0])
                    raise DataChanged(reply.reason, _assemble(stage_layers, weights, buffers))
                if isinstance(reply, Diverged):
                    weights, buffers = _collect_trained(rt, shard_refs, stage_refs[0])
                    finite = bool(torch.isfinite(weights).all())
                    model = _assemble(stage_layers, weights, buffers) if finite else None
                    raise TrainingDiverged(reply.reason, model)
        except KeyboardInterrupt as stop:
            # Ctrl-C or SIGTERM: the runtimes stop between two messages, so every actor is whole.
            weights, buffers = _collect_trained(rt, shard_refs, stage_refs[0])
            model = _assemble(stage_layers, weights, buffers)
            raise TrainingInterrupted(model, getattr(stop, "signum", signal.SIGINT)) from None
        except ActorFailed as exc:
            if not isinstance(exc.cause, DataFileChanged):
                raise
            # A data shard found its file changed under it: keep what was trained, as Ctrl-C does.
            try:
                weights, buffers = _collect_trained(rt, shard_refs, stage_refs[0])
                model = _assemble(stage_layers, weights, buffers)
            except Exception:  # the runtime could not answer after the failure
                model = None
            raise DataChanged(str(exc.cause), model) from None
        raise RuntimeError("the runtime stopped without a result")  # pragma: no cover
    finally:
        rt.shutdown()


def most_counts(
    config: DownpourConfig, layout: Layout, rows: int, stages: int
) -> dict[str, dict[str, int]]:
    """The last step number each replica's data shard and stages see, and the most updates
    each shard applies, in a run where no fault makes a replica redo a step: what a fault
    plan's counts are checked against (``faults.check_reachable``)."""
    most: dict[str, dict[str, int]] = {}
    updates = [0] * len(layout.shard_ranges)
    for r, (lo, hi) in enumerate(replica_ranges(rows, config.replicas)):
        steps = config.epochs * -(-(hi - lo) // config.batch_size)
        most[f"data{r}"] = {"step": steps - 1}  # steps are numbered from 0
        for s in range(stages):
            most[f"replica{r}.stage{s}"] = {"step": steps - 1}
            for shard in {seg.shard for seg in layout.segments_of_stage(s)}:
                updates[shard] += -(-steps // config.n_push)  # a push per n_push steps
    for k, n in enumerate(updates):
        most[f"shard{k}"] = {"update": n}
    return most


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


def _stats(
    done: TrainingDone,
    config: DownpourConfig,
    resume: Checkpoint | None = None,
    lost: int | None = None,
) -> dict[str, Any]:
    applied = [int(s["updates_applied"]) for s in done.shard_stats]
    total_applied = sum(applied)
    # A resumed run's counters carry on from the checkpoint's; its examples and steps (and
    # so its speed) are this run's own.
    before = resume.positions.values() if resume is not None else ()
    examples = done.examples - sum(int(p["examples"]) for p in before)
    steps = done.steps - sum(int(p["steps"]) for p in before)
    resumed = {
        "resumed_from": str(resume.path) if resume is not None else None,
        "resumed_from_update": resume.update if resume is not None else None,
        # updates applied after that checkpoint by the run that wrote it, as far as its last
        # progress report knew (a lower bound; None when not recorded)
        "updates_lost": lost,
    }
    return {
        "updates_applied": applied,
        "updates_applied_total": total_applied,
        "staleness_mean": sum(s["staleness_sum"] for s in done.shard_stats) / max(total_applied, 1),
        "staleness_max": int(max(s["staleness_max"] for s in done.shard_stats)),
        "staleness_histogram": _sum_histograms(
            [s.get("staleness_histogram", []) for s in done.shard_stats]
        ),
        "rejected_pushes": int(sum(s["rejected_pushes"] for s in done.shard_stats)),
        "examples": examples,
        "steps": steps,
        "train_s": done.train_s,
        "eval_s": done.eval_s,
        "examples_per_s": examples / done.train_s if done.train_s > 0 else float("nan"),
        "seed": config.seed,
        "restarts": done.restarts,
        "nonfinite_steps": done.nonfinite_steps,
        "recoveries": [dict(r) for r in done.recoveries],
        **resumed,
        **done.checkpoints,
    }


def _sum_histograms(histograms: list[list[int]]) -> list[int]:
    """Entry-wise sum of count lists of different lengths."""
    total = [0] * max((len(h) for h in histograms), default=0)
    for h in histograms:
        for i, c in enumerate(h):
            total[i] += c
    return total
