"""Wiring a Downpour SGD run: spawn the shards, data shards, stages and the master, run until
the master reports, and build the result (the skeleton is ``algorithms.driver``'s).
``api.train`` checks the inputs and hands over here."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.blocks import StagePlan, stage_cut, stage_plans
from ...core.flat import flatten, parameters_of
from ...core.layout import Layout, Range, Segment
from ...data.formats import DataFileChanged
from ...data.inputs import replica_ranges
from ...errors import ActorFailed, ConfigError, DataChanged, TrainingDiverged
from ...evaluate import assemble
from ...results import History, TrainResult
from ...runtime import Runtime, faults
from ...storage.checkpoint import (
    Checkpoint,
    Checkpointer,
    check_compatible,
    describe_parameters,
    load,
    remove_partial,
    updates_lost,
)
from ..driver import Driver, Job
from .checkpoints import take_on_stop
from .config import DownpourConfig
from .data_shard import DataShard
from .master import DownpourMaster
from .messages import (
    BufferSnapshot,
    ConnectDataShard,
    ConnectMaster,
    ConnectPartition,
    ConnectStage,
    DataUnreadable,
    Diverged,
    ShardSnapshot,
    Snapshot,
    StageBuffers,
    TrainingDone,
)
from .parameter_shard import ParameterShard
from .partition import Partition
from .stage import Stage

log = logging.getLogger("distbelief")


def build_layout(stage_layers: list[list[nn.Module]], shards: int) -> Layout:
    """The flat parameter space of these stages over ``shards`` shards."""
    tensor_sizes = [[p.numel() for p in parameters_of(group)] for group in stage_layers]
    return Layout.build(
        [sum(sizes) for sizes in tensor_sizes], shards, [n for sizes in tensor_sizes for n in sizes]
    )


@dataclass(frozen=True)
class Owner:
    """A partition's place in the flat parameter space: its ranges and their segments."""

    stage: int
    block: int
    ranges: tuple[Range, ...]
    segments: tuple[Segment, ...]


def partition_owners(layout: Layout, plans: list[StagePlan]) -> list[Owner]:
    """Every partition of a replica, owner ``stage * P + block`` at index ``stage * P +
    block``: its ranges (``StagePlan.block_ranges``) and its segments on the shards."""
    owners = []
    for s, plan in enumerate(plans):
        for b, ranges in enumerate(plan.block_ranges(layout.stage_ranges[s][0])):
            owner = s * plan.parts + b
            owners.append(Owner(s, b, ranges, layout.segments_of_ranges(owner, ranges)))
    return owners


MUST_AGREE = ("batch_size", "optimizer", "lr", "seed", "partitions")
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
    if saved.get("partitions", 1) != config.partitions:
        raise ConfigError(
            f"partitions: {where} was taken with partitions {saved.get('partitions', 1)!r}, "
            f"this run has {config.partitions!r}; resume with the same partitions (each "
            "partition's update-rule state is held apart)"
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


def run(job: Job) -> TrainResult:
    """Run Downpour SGD on a checked ``job`` and return the result; from ``job.resume``
    (checked by :func:`prepare_resume`) if given."""
    return DownpourDriver(job).run()


class DownpourDriver(Driver):
    """Downpour's hooks of the shared skeleton: the shards, data shards, stages and master
    it spawns; the master's reports of unreadable data and of divergence; the shards'
    parameters and replica 0's buffers collected after a stop."""

    done = TrainingDone

    def prepare(self) -> None:
        """Set up the checkpoints and refuse a planned fault this run never reaches."""
        config, job = self.config, self.job
        # updates the run that wrote the checkpoint lost: read before this run's reports
        self.lost = updates_lost(job.resume) if job.resume is not None else None
        self.layout = build_layout(job.stage_layers, config.shards)
        self.owners: list[Owner] = []
        if config.partitions > 1:
            in_shape = tuple(job.rows.probe()[0].shape[1:])
            plans = stage_plans(job.stage_layers, config.partitions, in_shape)
            self.plans = plans
            # per stage, what crosses into it from the one before when only strips need to
            self.cuts = [None] + [stage_cut(a, b) for a, b in zip(plans, plans[1:])]
            self.owners = partition_owners(self.layout, plans)
        self.checkpointer = None
        if config.checkpoint_dir is not None:
            remove_partial(config.checkpoint_dir)  # a write the last run's crash cut off
            self.checkpointer = Checkpointer(
                config.checkpoint_dir,
                layout=self.layout,
                parameters=describe_parameters(job.layers),
                config=checkpoint_config(config, len(job.rows), job.checkpoint_meta),
            )
        # A planned fault whose count this run never reaches is refused before anything starts.
        plan = faults.plan(config.runtime_options.get("faults"))
        if plan:
            most = most_counts(
                config, self.layout, len(job.rows), len(job.stage_layers), self.owners
            )
            faults.check_reachable(plan, most)

    def start(self, rt: Runtime) -> Any:
        """Spawn and wire every actor; the master drives the run."""
        config, job, layout = self.config, self.job, self.layout
        rows, stage_layers = job.rows, job.stage_layers
        initial = flatten(job.layers).to(job.dtype)
        resume = job.resume
        positions: Mapping[int, Mapping[str, int]] = resume.positions if resume is not None else {}
        owners, P = self.owners, config.partitions
        if owners:  # each shard holds the partitions' segments, several per partition
            by_shard: list[list[Segment]] = [[] for _ in layout.shard_ranges]
            for owner in owners:
                for seg in owner.segments:
                    by_shard[seg.shard].append(seg)
            shard_segments = [tuple(sorted(g, key=lambda seg: seg.start)) for g in by_shard]
        else:
            shard_segments = [layout.segments_of_shard(k) for k in range(len(layout.shard_ranges))]
        shard_refs = tuple(
            rt.spawn(
                f"shard{k}",
                ParameterShard,
                k,
                initial[a:b],
                a,
                shard_segments[k],
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
                    pipeline_depth=config.pipeline_depth,
                )
            )
            if owners:
                stage_refs.append(self._spawn_partitions(rt, r, stage_layers))
                continue
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
                        job.loss_fn if s == n_stages - 1 else None,
                        config.n_fetch,
                        config.n_push,
                        config.local_lr,
                        pipeline_depth=config.pipeline_depth,
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
            job.evaluator,
            config.eval_every,
            max(1, total_examples // 100),
            rt.single_threaded,
            checkpoint_dir=config.checkpoint_dir,
            checkpointer=self.checkpointer,
            checkpoint_every=config.checkpoint_every,
            resumed=resumed,
            # one mark per (replica, stage, shard) segment; per (partition, shard) with them
            segment_positions=_positions(shard_segments, layout) if owners else None,
            checkpoint_marks=config.replicas
            * (
                sum(len({seg.shard for seg in o.segments}) for o in owners)
                if owners
                else sum(len(layout.segments_of_stage(s)) for s in range(n_stages))
            ),
        )
        # Replica 0's stages with buffers: an evaluation during training asks them for theirs.
        buffer_stages = tuple(
            stage_refs[0][s * P]
            for s, group in enumerate(stage_layers)
            if job.evaluator is not None and any(True for g in group for _ in g.buffers())
        )
        # Replica 0's stage (its first partition) per stage: asked for buffers after a stop.
        self.buffer_refs = [stage_refs[0][s * P] for s in range(n_stages)]
        rt.tell(
            master,
            ConnectMaster(
                tuple(data_refs), shard_refs, buffer_stages, tuple(map(tuple, stage_refs))
            ),
        )
        for r in range(config.replicas):
            refs = stage_refs[r]
            if owners:
                blocks = [tuple(refs[s * P : (s + 1) * P]) for s in range(n_stages)]
                rt.tell(data_refs[r], ConnectDataShard(tuple(refs), master, blocks[0], P))
                for s, ref in enumerate(refs):
                    stage = s // P
                    connect = ConnectPartition(
                        blocks[stage - 1] if stage > 0 else None,
                        blocks[stage],
                        blocks[stage + 1] if stage + 1 < n_stages else None,
                        shard_refs,
                        data_refs[r],
                    )
                    rt.tell(ref, connect)
                continue
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
        self.shard_refs, self.stage_refs, self.master = shard_refs, stage_refs, master
        return master

    def _spawn_partitions(
        self, rt: Runtime, r: int, stage_layers: list[list[nn.Module]]
    ) -> list[Any]:
        """Replica ``r``'s partitions, each stage's in turn (``replica<r>.stage<s>.part<b>``)."""
        config, n_stages = self.config, len(stage_layers)
        refs = []
        for owner in self.owners:
            s, b = owner.stage, owner.block
            refs.append(
                rt.spawn(
                    f"replica{r}.stage{s}.part{b}",
                    Partition,
                    r,
                    s,
                    b,
                    self.plans[s],
                    self.plans[s - 1].output if s > 0 else None,
                    copy.deepcopy(stage_layers[s]),
                    owner.segments,
                    owner.ranges,
                    self.job.loss_fn if s == n_stages - 1 and b == 0 else None,
                    config.n_fetch,
                    config.n_push,
                    config.local_lr,
                    self.cuts[s],
                    self.cuts[s + 1] if s + 1 < n_stages else None,
                )
            )
        return refs

    def receive(self, rt: Runtime, reply: Any) -> None:
        """The master's report that a data shard cannot read its data, or that the run
        diverged: keep what was trained (if finite) in the error."""
        if isinstance(reply, DataUnreadable):
            raise DataChanged(reply.reason, self.trained(rt))
        if isinstance(reply, Diverged):
            weights, buffers = _collect_trained(rt, self.shard_refs, self.buffer_refs)
            finite = bool(torch.isfinite(weights).all())
            model = assemble(self.job.stage_layers, weights, buffers) if finite else None
            raise TrainingDiverged(reply.reason, model)

    def trained(self, rt: Runtime) -> nn.Module:
        """The shards' parameters with replica 0's buffers."""
        weights, buffers = _collect_trained(rt, self.shard_refs, self.buffer_refs)
        return assemble(self.job.stage_layers, weights, buffers)

    def stopped(self, rt: Runtime) -> tuple[nn.Module, tuple[str, int] | None]:
        """Where checkpoints are on, the master writes a last one first (``take_on_stop``):
        the model kept is the parameters it holds, with replica 0's buffers."""
        taken = take_on_stop(rt, self.master, self.config.timeout_s) if self.checkpointer else None
        if taken is None:  # checkpoints off, or the round could not be taken
            return super().stopped(rt)
        weights, buffers = _collect_trained(rt, self.shard_refs, self.buffer_refs, taken.weights)
        model = assemble(self.job.stage_layers, weights, buffers)
        return model, ((taken.path, taken.steps) if taken.path is not None else None)

    def failed(self, rt: Runtime, exc: ActorFailed) -> None:
        """A data shard found its file changed under it: keep what was trained, as Ctrl-C
        does."""
        if not isinstance(exc.cause, DataFileChanged):
            return
        try:
            model = self.trained(rt)
        except Exception:  # the runtime could not answer after the failure
            model = None
        raise DataChanged(str(exc.cause), model) from None

    def result(
        self, done: TrainingDone, runtime_stats: dict[str, Any]
    ) -> tuple[nn.Module, History, dict[str, Any]]:
        """The model of the master's final snapshot; refused when its parameters are not
        finite or when more pushes were rejected (NaN or Inf) than applied."""
        result_model = assemble(self.job.stage_layers, done.weights, done.buffers)
        stats = {**self._stats(done), **runtime_stats}
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
        return result_model, history, stats

    def _stats(self, done: TrainingDone) -> dict[str, Any]:
        applied = [int(s["updates_applied"]) for s in done.shard_stats]
        total_applied = sum(applied)
        resume = self.job.resume
        # A resumed run's counters carry on from the checkpoint's; its examples and steps
        # (and so its speed) are this run's own.
        before = resume.positions.values() if resume is not None else ()
        examples = done.examples - sum(int(p["examples"]) for p in before)
        steps = done.steps - sum(int(p["steps"]) for p in before)
        shard_stats = done.shard_stats
        return {
            "updates_applied": applied,
            "updates_applied_total": total_applied,
            "staleness_mean": sum(s["staleness_sum"] for s in shard_stats) / max(total_applied, 1),
            "staleness_max": int(max(s["staleness_max"] for s in shard_stats)),
            "staleness_histogram": _sum_histograms(
                [s.get("staleness_histogram", []) for s in shard_stats]
            ),
            "rejected_pushes": int(sum(s["rejected_pushes"] for s in shard_stats)),
            # bytes the partitions of a stage sent each other (pieces and their gradients)
            "partition_bytes": done.crossed_bytes,
            "steps": steps,
            "eval_s": done.eval_s,
            **self.common_stats(examples, done),
            "nonfinite_steps": done.nonfinite_steps,
            "recoveries": [dict(r) for r in done.recoveries],
            "resumed_from_update": resume.update if resume is not None else None,
            # updates applied after that checkpoint by the run that wrote it, as far as its
            # last progress report knew (a lower bound; None when not recorded)
            "updates_lost": self.lost,
            **done.checkpoints,
        }


def most_counts(
    config: DownpourConfig,
    layout: Layout,
    rows: int,
    stages: int,
    owners: list[Owner] | tuple[()] = (),
) -> dict[str, dict[str, int]]:
    """The last step number each replica's data shard and stages see, and the most updates
    each shard applies, in a run where no fault makes a replica redo a step: what a fault
    plan's counts are checked against (``faults.check_reachable``)."""
    most: dict[str, dict[str, int]] = {}
    updates = [0] * len(layout.shard_ranges)
    for r, (lo, hi) in enumerate(replica_ranges(rows, config.replicas)):
        steps = config.epochs * -(-(hi - lo) // config.batch_size)
        most[f"data{r}"] = {"step": steps - 1}  # steps are numbered from 0
        for owner in owners:  # partitions
            most[f"replica{r}.stage{owner.stage}.part{owner.block}"] = {"step": steps - 1}
            for shard in {seg.shard for seg in owner.segments}:
                updates[shard] += -(-steps // config.n_push)
        for s in range(0 if owners else stages):
            most[f"replica{r}.stage{s}"] = {"step": steps - 1}
            for shard in {seg.shard for seg in layout.segments_of_stage(s)}:
                updates[shard] += -(-steps // config.n_push)  # a push per n_push steps
    for k, n in enumerate(updates):
        most[f"shard{k}"] = {"update": n}
    return most


def _positions(
    shard_segments: list[tuple[Segment, ...]], layout: Layout
) -> dict[int, dict[int, tuple[Range, ...]]]:
    """Per shard, each owner's ranges within the shard's slice (a checkpoint's slice is cut
    by them when a shard is restored: partitions' ranges interleave)."""
    out: dict[int, dict[int, tuple[Range, ...]]] = {}
    for k, segs in enumerate(shard_segments):
        start = layout.shard_ranges[k][0]
        mine: dict[int, list[Range]] = {}
        for seg in segs:
            mine.setdefault(seg.stage, []).append((seg.start - start, seg.stop - start))
        out[k] = {owner: tuple(ranges) for owner, ranges in mine.items()}
    return out


INTERRUPTED = -2
"""Tag of the snapshots collected after Ctrl-C (the master's are >= 1, and -1 the final)."""


def _collect_trained(
    rt: Any,
    shard_refs: tuple,
    stage_refs: list,
    weights: torch.Tensor | None = None,
    timeout: float = 60.0,
) -> tuple[torch.Tensor, tuple]:
    """The shards' current parameters (unless ``weights`` are given) and replica 0's buffers,
    asked for by the driver."""

    def ask(ref: Any, request: Any, reply_type: type) -> Any:
        for reply in rt.converse(ref, request, timeout=timeout):
            if isinstance(reply, reply_type) and reply.tag == INTERRUPTED:
                return reply
        raise RuntimeError("the runtime stopped without a reply")  # pragma: no cover

    if weights is None:
        parts = [ask(s, Snapshot(INTERRUPTED), ShardSnapshot).weights for s in shard_refs]
        weights = torch.cat(parts)
    buffers = [ask(s, BufferSnapshot(INTERRUPTED), StageBuffers).buffers for s in stage_refs]
    return weights, tuple(buffers)


def _sum_histograms(histograms: list[list[int]]) -> list[int]:
    """Entry-wise sum of count lists of different lengths."""
    total = [0] * max((len(h) for h in histograms), default=0)
    for h in histograms:
        for i, c in enumerate(h):
            total[i] += c
    return total
