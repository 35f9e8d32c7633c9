"""Wiring a Sandblaster L-BFGS run: spawn the shards, the replicas and the coordinator, run
until the coordinator reports, collect the parameters from the shards, build the result (the
skeleton is ``algorithms.driver``'s). ``api.train`` checks the inputs and hands over here."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.blocks import StagePlan, stage_cut, stage_plans
from ...core.flat import flatten, parameters_of
from ...core.layout import Layout, Range, shard_ranges
from ...core.partition import layer_sizes, resolve_split_points, split_layers
from ...data.inputs import TensorRows
from ...errors import ConfigError, NothingToTrain, TrainingDiverged
from ...evaluate import LossFn, assemble
from ...results import History, ProgressReport, TrainResult
from ...runtime import Runtime, faults
from ...storage.checkpoint import (
    Checkpoint,
    Checkpointer,
    ShardState,
    check_compatible,
    describe_parameters,
    load,
    remove_partial,
)
from ..driver import Driver, Job
from .config import SandblasterConfig
from .coordinator import Coordinator
from .lbfgs import FINAL_STOPS, Settings
from .messages import (
    ConnectPartition,
    ConnectReplica,
    ConnectSandblaster,
    CoordinatorState,
    SandblasterDone,
    ShardVectors,
    StopAtStepEnd,
    StoppedAtStepEnd,
    VectorSlice,
    VectorSnapshot,
    VectorsRequest,
)
from .partition import SandblasterPartition
from .portions import batch_size_of
from .replica import ReplicaSplit, SandblasterReplica
from .shard import SandblasterShard

OPTIONS = ("slow_replicas", "backup_tasks", "duplicate_portions", "eval_steps")
"""Sandblaster's own keys of ``runtime_options`` (for tests and benchmarks):

- ``slow_replicas``: ``{replica: factor}``, each portion of that replica takes ``factor`` times
  as long (a sleep where actors run in parallel; turns of the run queue in one thread);
- ``backup_tasks``: False turns backup tasks off (default True);
- ``duplicate_portions``: True hands every portion to two replicas (exactly-once tests);
- ``eval_steps``: True evaluates the parameters of every step on ``eval_data`` (the driver
  snapshots them from the shards during the run and evaluates them after it), so
  ``history.eval`` has a point per step with its wall time."""


def split_options(config: SandblasterConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``runtime_options`` split into Sandblaster's own (checked) and the runtime's."""
    own = {k: v for k, v in config.runtime_options.items() if k in OPTIONS}
    rest = {k: v for k, v in config.runtime_options.items() if k not in OPTIONS}
    slow = own.get("slow_replicas", {})
    if not isinstance(slow, dict) or any(
        not isinstance(r, int) or not 0 <= r < config.replicas or not float(f) >= 1.0
        for r, f in slow.items()
    ):
        raise ConfigError(
            f"runtime_options: slow_replicas must map replica indices to factors >= 1, got {slow!r}"
        )
    return own, rest


def check_survivable(plan: tuple, replicas: int) -> None:
    """Refuse, before the run, a planned death Sandblaster cannot recover from: only its
    replicas restart (their portions are handed out again); the coordinator holds L-BFGS's
    state and the shards the only copy of every vector."""
    for fault in faults.kills(plan).values():
        if not fault.actor.startswith("replica"):
            names = ", ".join(f"replica{r}" for r in range(min(replicas, 3)))
            raise ConfigError(
                f"faults: {fault}: Sandblaster cannot survive the death of {fault.actor} "
                f"(only replicas restart: {names}{', ...' if replicas > 3 else ''})"
            )


def settings_of(config: SandblasterConfig, float64: bool) -> Settings:
    """L-BFGS settings of a run (tolerances tighter in float64)."""
    return Settings(
        steps=config.steps,
        history=config.history,
        max_evals=config.steps * 3 + 1,
        tolerance_grad=1e-10 if float64 else 1e-7,
        tolerance_change=1e-14 if float64 else 1e-9,
        fresh_batches=config.batch_size is not None,
    )


MUST_AGREE = ("history", "batch_size", "seed")
"""Settings a resumed run must share with its checkpoint: the history ring's slots, the
batches (their size and, for mini-batches, the seed's order). Steps may change."""


def checkpoint_config(config: SandblasterConfig, train_examples: int, meta: Any) -> dict:
    """What a checkpoint's manifest records of the run (JSON), as Downpour's does."""
    settings = dataclasses.asdict(config)
    for key in ("runtime_options", "checkpoint_dir", "resume"):
        settings.pop(key)
    return {**settings, "algorithm": "sandblaster", "train_examples": train_examples,
            "meta": meta}  # fmt: skip


def build_layout(layers: list[nn.Module], shards: int) -> Layout:
    """Sandblaster's flat space: one stage, ``shards`` slices (as ``shard_ranges`` cuts it)."""
    sizes = [p.numel() for p in parameters_of(layers)]
    return Layout.build([sum(sizes)], shards, sizes)


def replica_split(
    stage_layers: list[list[nn.Module]], partitions: int, in_shape: tuple[int, ...]
) -> tuple[ReplicaSplit | None, list[StagePlan] | None]:
    """How each replica is split: None for one stage of one partition (the replica is one
    actor); else each partition's ranges of the flat space (owner ``stage * partitions +
    block``, stages laid end to end as the model's layers) and, with partitions, each stage's
    plan (``core.blocks.stage_plans``: a layer that cannot be split is a ``ConfigError``)."""
    stages = len(stage_layers)
    if stages == 1 and partitions == 1:
        return None, None
    sizes = [sum(p.numel() for p in parameters_of(group)) for group in stage_layers]
    starts = [sum(sizes[:s]) for s in range(stages)]
    owners: list[tuple[Range, ...]] = []
    plans = stage_plans(stage_layers, partitions, in_shape) if partitions > 1 else None
    for s in range(stages):
        if plans is None:
            owners.append(((starts[s], starts[s] + sizes[s]),) if sizes[s] else ())
        else:
            owners.extend(plans[s].block_ranges(starts[s]))
    output = plans[-1].output if plans is not None else None
    return ReplicaSplit(stages, partitions, tuple(owners), output), plans


def prepare_resume(
    config: SandblasterConfig, layers: list[nn.Module], train_examples: int
) -> Checkpoint:
    """Load and verify ``config.resume`` and check that this run can carry on from it; a
    ``ConfigError`` names the file or the setting that differs, and ``NothingToTrain`` says
    when the checkpoint has taken every step asked for (or stopped for good)."""
    ckpt = load(config.resume)
    where = ckpt.path / "manifest.json"
    saved = ckpt.manifest["config"]
    if saved.get("algorithm") != "sandblaster" or "coordinator" not in ckpt.manifest:
        raise ConfigError(
            f"resume: {where} is a Downpour checkpoint; resume it with algorithm='downpour'"
        )
    check_compatible(ckpt, describe_parameters(layers), build_layout(layers, config.shards))
    for name in MUST_AGREE:
        if saved.get(name) != getattr(config, name):
            raise ConfigError(
                f"{name}: {where} was taken with {name} {saved.get(name)!r}, this run has "
                f"{getattr(config, name)!r}; resume with the same {name}"
            )
    if saved.get("train_examples") != train_examples:
        raise ConfigError(
            f"train_data: {where} was taken on {saved.get('train_examples')} training "
            f"examples, this run has {train_examples}; resume on the same data"
        )
    state = ckpt.manifest["coordinator"]
    if state["step"] >= config.steps or state["stop"] in FINAL_STOPS:
        why = f" (L-BFGS stopped there: {state['stop']})" if state["stop"] != "steps" else ""
        raise NothingToTrain(
            f"steps: nothing to train: the checkpoint is at step {state['step']} of "
            f"{config.steps}{why}"
        )
    return ckpt


def run(job: Job) -> TrainResult:
    """Run Sandblaster L-BFGS on a checked ``job`` and return the result; from
    ``job.resume`` (checked by :func:`prepare_resume`) if given."""
    return SandblasterDriver(job).run()


class SandblasterDriver(Driver):
    """Sandblaster's hooks of the shared skeleton: the shards, replicas and coordinator it
    spawns; the checkpoints it assembles from the coordinator's state and the shards'
    vectors; the per-step snapshots of ``eval_steps``; ``"x"`` collected from the shards.
    ``vectors``: names of other vectors to collect at the end, filled in (tests)."""

    done = SandblasterDone

    def __init__(self, job: Job, vectors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(job)
        self.own, self.rest = split_options(self.config)
        self.vectors = vectors
        self.trace: list[tuple[float, torch.Tensor]] | None = None  # see prepare
        self.walls: list[float] = []  # seconds since the start at the end of each step
        self.checkpointer: Checkpointer | None = None

    def prepare(self) -> None:
        """Refuse a planned death it cannot survive and more portions than examples; set up
        the checkpoints and the per-step snapshots."""
        config, job = self.config, self.job
        check_survivable(faults.plan(self.rest.get("faults")), config.replicas)
        portions = config.portion_count
        batch_examples = batch_size_of(len(job.rows), config.batch_size)
        if portions > batch_examples:
            raise ConfigError(
                f"portions: {portions} portions but a batch has {batch_examples} examples"
            )
        self.trace = [] if self.own.get("eval_steps") else None
        if config.checkpoint_dir is not None:
            remove_partial(config.checkpoint_dir)  # a write the last run's crash cut off
            self.checkpointer = Checkpointer(
                config.checkpoint_dir,
                layout=build_layout(job.layers, config.shards),
                parameters=describe_parameters(job.layers),
                config=checkpoint_config(config, len(job.rows), job.checkpoint_meta),
            )

    def runtime_options(self) -> dict[str, Any]:
        """``runtime_options`` without Sandblaster's own."""
        return dict(self.rest)

    def start(self, rt: Runtime) -> Any:
        """Spawn and wire every actor; the coordinator drives the run."""
        config, job, own = self.config, self.job, self.own
        x, y = job.rows.x, job.rows.y
        initial = flatten(job.layers).to(job.dtype)
        slices = shard_ranges(initial.numel(), config.shards)
        resume = job.resume
        saved = [_vectors_of(s) for s in resume.shards] if resume is not None else None
        shard_refs = tuple(
            rt.spawn(f"shard{k}", SandblasterShard, k, initial[a:b], _or_none(saved, k))
            for k, (a, b) in enumerate(slices)
        )
        slow = own.get("slow_replicas", {})
        names = tuple(f"replica{r}" for r in range(config.replicas))
        slow_down = getattr(rt, "slow_down", None)
        if slow_down is not None:
            # In virtual time (the simulated runtime): the runtime stretches the replica's
            # compute; its own fallback, turns of the run queue, would cost no virtual time.
            for r, factor in slow.items():
                slow_down(names[r], float(factor))
            slow = {}
        split, plans = replica_split(job.stage_layers, config.partitions, tuple(x.shape[1:]))
        replica_refs = tuple(
            rt.spawn(
                names[r],
                SandblasterReplica,
                r,
                copy.deepcopy(job.layers),
                job.loss_fn,
                x,
                y,
                slices,
                config.batch_size,
                config.portion_count,
                config.seed,
                config.push_every,
                float(slow.get(r, 1.0)),
                rt.single_threaded,
                split,
            )  # fmt: skip
            for r in range(config.replicas)
        )
        # Every actor is spawned before any is told anything (a runtime may start them then).
        partition_refs = (
            [self._spawn_partitions(rt, r, split, plans) for r in range(config.replicas)]
            if split is not None
            else []
        )
        coordinator = rt.spawn(
            "coordinator",
            Coordinator,
            settings_of(config, job.dtype == torch.float64),
            config.replicas,
            config.portion_count,
            batch_size_of(len(x), config.batch_size),
            bool(own.get("backup_tasks", True)),
            bool(own.get("duplicate_portions", False)),
            names,
            checkpoint_every=config.checkpoint_every,
            checkpoints=self.checkpointer is not None,
            resume=resume.manifest["coordinator"] if resume is not None else None,
        )
        wiring = ConnectSandblaster(shard_refs, replica_refs, coordinator)
        rt.tell(coordinator, wiring)
        for ref in replica_refs:
            rt.tell(ref, wiring)
        for replica, refs in zip(replica_refs, partition_refs):
            assert split is not None
            self._wire_partitions(rt, replica, refs, split)
        self.shard_refs, self.coordinator = shard_refs, coordinator
        self.pending: dict[int, list] = {}  # step -> (wall_s, slices so far), for ``trace``
        self.taking = _Checkpoints(self.checkpointer, len(shard_refs))
        return coordinator

    def _spawn_partitions(
        self,
        rt: Runtime,
        r: int,
        split: ReplicaSplit,
        plans: list[StagePlan] | None,
    ) -> list[Any]:
        """Replica ``r``'s partitions (``replica<r>.stage<s>.part<b>``), by owner."""
        S, P = split.stages, split.partitions
        refs = []
        for s, group in enumerate(self.job.stage_layers):
            plan = plans[s] if plans is not None else None
            before = plans[s - 1].output if plans is not None and s > 0 else None
            # what crosses into stage s (and into s + 1) when only strips need to
            entry = stage_cut(plans[s - 1], plans[s]) if plans is not None and s > 0 else None
            leaving = stage_cut(plans[s], plans[s + 1]) if plans is not None and s + 1 < S else None
            for b in range(P):
                refs.append(
                    rt.spawn(
                        f"replica{r}.stage{s}.part{b}",
                        SandblasterPartition,
                        r,
                        s,
                        b,
                        plan,
                        before,
                        copy.deepcopy(group),
                        S,
                        entry,
                        leaving,
                    )  # fmt: skip
                )
        return refs

    def _wire_partitions(
        self, rt: Runtime, replica: Any, refs: list[Any], split: ReplicaSplit
    ) -> None:
        """A replica's partitions told each other and their replica, and it them."""
        S, P = split.stages, split.partitions
        blocks = [tuple(refs[s * P : (s + 1) * P]) for s in range(S)]
        for s in range(S):
            for ref in blocks[s]:
                wiring = ConnectPartition(
                    replica,
                    blocks[s],
                    blocks[s - 1] if s > 0 else None,
                    blocks[s + 1] if s + 1 < S else None,
                )
                rt.tell(ref, wiring)
        rt.tell(replica, ConnectReplica(tuple(refs)))

    def report(self, report: ProgressReport) -> None:
        """Each step's report: its wall time kept for the history, then passed on."""
        self.walls.append(report.wall_s)
        super().report(report)

    def receive(self, rt: Runtime, reply: Any) -> None:
        """A checkpoint's parts, or a snapshot of the step's parameters (``eval_steps``)."""
        if isinstance(reply, (CoordinatorState, ShardVectors)):
            self.taking.got(reply)
        elif self.trace is not None:
            _trace(rt, self.shard_refs, reply, self.trace, self.pending)

    def finish(self, rt: Runtime, done: SandblasterDone) -> SandblasterDone:
        """The snapshots and the checkpoint still on their way, then ``"x"`` (and
        ``vectors``) from the shards."""
        timeout = self.config.timeout_s
        if self.trace is not None and self.pending:
            _drain(rt, self.shard_refs, self.trace, self.pending, timeout)
        if self.checkpointer is not None:
            done = self.taking.finish(rt, self.shard_refs, done, timeout)
        self.weights = collect(rt, self.shard_refs, "x")
        for name in self.vectors or {}:
            self.vectors[name] = collect(rt, self.shard_refs, name)
        return done

    def trained(self, rt: Runtime) -> nn.Module:
        """The shards' ``"x"``."""
        return assemble([self.job.layers], collect(rt, self.shard_refs, "x"), ({},))

    def stopped(self, rt: Runtime) -> tuple[nn.Module, tuple[str, int] | None]:
        """Where checkpoints are on, the coordinator ends the run at the end of the step
        under way and a checkpoint of that step is written (``StopAtStepEnd``): the model kept
        is its ``"x"``. Before any step of this run has ended, nothing new is written."""
        if self.checkpointer is None:
            return super().stopped(rt)
        timeout = self.config.timeout_s
        for reply in rt.converse(self.coordinator, StopAtStepEnd(), timeout=timeout):
            if isinstance(reply, (CoordinatorState, ShardVectors)):
                self.taking.got(reply)
            elif isinstance(reply, SandblasterDone):  # it ended before it heard of the stop
                done = self.finish(rt, reply)
                model = assemble([self.job.layers], self.weights, ({},))
                last = done.checkpoints.get("last_checkpoint")
                return model, ((last, done.steps) if last is not None else None)
            elif isinstance(reply, StoppedAtStepEnd):
                break
        if reply.step is None:
            return self.trained(rt), None
        # (not the shards' "x" asked for now: the driver's request need not arrive after
        # the coordinator's last program; the checkpoint's vectors are of the step's end)
        x, written = self.taking.complete(rt, self.shard_refs, reply.step, timeout)
        model = assemble([self.job.layers], x, ({},))
        return model, ((str(written), reply.step) if written is not None else None)

    def result(
        self, done: SandblasterDone, runtime_stats: dict[str, Any]
    ) -> tuple[nn.Module, History, dict[str, Any]]:
        """The model of the shards' ``"x"``, the loss of each step (and the evaluation of
        each, with ``eval_steps``); refused when L-BFGS diverged or ended on NaN or Inf."""
        config, weights, walls = self.config, self.weights, self.walls
        result_model = assemble([self.job.layers], weights, ({},))
        batch_examples = batch_size_of(len(self.job.rows), config.batch_size)
        before = len(done.losses) - len(walls)  # steps a resumed run's checkpoint had taken
        history = History(
            train=[
                {"examples": (before + i + 1) * batch_examples, "wall_s": wall_s, "loss": loss}
                for i, (loss, wall_s) in enumerate(zip(done.losses[before:], walls, strict=True))
            ]
        )
        evaluator = self.job.evaluator
        if evaluator is not None and self.trace:
            for step, (wall_s, point) in enumerate(self.trace, 1):
                metrics = evaluator(point)
                history.eval.append(
                    {"examples": step * batch_examples, "wall_s": wall_s, **metrics}
                )
        resume = self.job.resume
        stats = {
            "steps": done.steps,
            "function_evals": done.function_evals,
            "stop": done.stop,
            "final_loss": done.loss,
            "portions": config.portion_count,
            "portions_done": list(done.portions_done),
            "portions_computed": list(done.portions_computed),
            "backup_portions": done.backup_portions,
            "backup_wins": done.backup_wins,
            "duplicates_dropped": done.duplicates_dropped,
            "reassigned": done.reassigned,
            "coordinator_bytes": done.coordinator_bytes,
            "coordinator_messages": done.coordinator_messages,
            "partition_bytes": done.partition_bytes,
            "parameters": int(weights.numel()),
            **self.common_stats(done.examples, done),
            "resumed_from_step": resume.update if resume is not None else None,
            **done.checkpoints,
            **runtime_stats,
        }
        # As for Downpour: a run that ends in NaN or Inf is never returned as a result.
        finite = bool(torch.isfinite(weights).all())
        if done.stop == "diverged" or not finite or not math.isfinite(done.loss):
            reason = done.diverged or (
                "the final parameters hold NaN or Inf" if not finite else f"the loss is {done.loss}"
            )
            raise TrainingDiverged(reason, result_model if finite else None, stats)
        return result_model, history, stats


class _Checkpoints:
    """The driver's part of Sandblaster's checkpoints: the coordinator's state of a step and
    every shard's vectors of it come in separately; once all are in, the checkpointer writes
    them (in the background; the last one before the run is reported done)."""

    def __init__(self, checkpointer: Checkpointer | None, shards: int) -> None:
        self.checkpointer = checkpointer
        self.shards = shards
        self.states: dict[int, dict[str, Any]] = {}  # step -> the coordinator's state
        self.vectors: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # step -> shard ->
        self.written = 0  # the newest step handed to the checkpointer
        self.x: torch.Tensor | None = None  # its "x"

    def got(self, reply: CoordinatorState | ShardVectors) -> None:
        if isinstance(reply, CoordinatorState):
            self.states[reply.step] = reply.state
        else:
            self.vectors.setdefault(reply.tag, {})[reply.shard] = reply.vectors
        complete = [s for s in self.states if len(self.vectors.get(s, {})) == self.shards]
        if complete:
            self._submit(max(complete))

    def _submit(self, step: int) -> None:
        state, got = self.states.pop(step), self.vectors.pop(step)
        for older in [s for s in self.states if s < step]:  # superseded: only the newest kept
            self.states.pop(older)
            self.vectors.pop(older, None)
        shards = [_shard_state(k, got[k]) for k in range(self.shards)]
        self.checkpointer.submit(step, shards, {}, extra={"coordinator": state})
        self.written = step
        self.x = torch.cat([s.weights for s in shards])

    def finish(
        self, rt: Any, shard_refs: tuple, done: SandblasterDone, timeout: float
    ) -> SandblasterDone:
        """The run is over: write the last step's checkpoint (:meth:`complete`), wait for
        it, and report what checkpointing did."""
        last = max(self.states, default=None)
        if last is not None and last == done.steps:
            self.complete(rt, shard_refs, last, timeout)
        self.checkpointer.join()
        return dataclasses.replace(done, checkpoints=self.checkpointer.stats)

    def complete(
        self, rt: Any, shard_refs: tuple, step: int, timeout: float
    ) -> tuple[torch.Tensor, Path | None]:
        """Write the checkpoint of ``step``, the last one of the run (it ended, or stopped
        there), and wait for it. Its vectors may still be on their way, to a reply inbox that
        is gone on some runtimes; no program ran after that step, so each shard missing is
        asked again, here. Returns its ``"x"`` and its path (None: not written)."""
        if self.written != step:
            got = self.vectors.setdefault(step, {})
            for k, ref in enumerate(shard_refs):
                if k in got:
                    continue
                for reply in rt.converse(ref, VectorsRequest(-2), timeout=timeout):
                    if isinstance(reply, ShardVectors) and reply.shard == k and reply.tag in (
                        step, -2,
                    ):  # fmt: skip
                        got[k] = reply.vectors
                        break
            self._submit(step)
        return self.x, self.checkpointer.written_at(step)


def _shard_state(index: int, vectors: dict[str, torch.Tensor]) -> ShardState:
    """A Sandblaster shard's vectors as a checkpoint's shard: ``"x"`` as the weights, the
    others as its "optimizer" state (every vector the run had at that step)."""
    # A copy op makes an alias (ops never write in place); safetensors stores no aliases.
    seen: set[int] = set()
    own: dict[str, torch.Tensor] = {}
    for name, v in sorted(vectors.items()):
        ptr = v.untyped_storage().data_ptr()
        own[name] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    rest = {name: v for name, v in own.items() if name != "x"}
    return ShardState(index, own["x"], optimizer=rest)


def _or_none(items: list | None, k: int) -> Any:
    return items[k] if items is not None else None


def _vectors_of(shard: ShardState) -> dict[str, torch.Tensor]:
    return {"x": shard.weights, **(shard.optimizer or {})}


def collect(rt: Any, shard_refs: tuple, name: str, timeout: float = 60.0) -> torch.Tensor:
    """A named vector assembled from every shard's slice, asked for by the driver."""
    parts = []
    for ref in shard_refs:
        for reply in rt.converse(ref, VectorSnapshot(name), timeout=timeout):
            if isinstance(reply, VectorSlice) and reply.name == name and reply.tag == -1:
                parts.append(reply.values)
                break
    return torch.cat(parts)


def initial_gradient(
    model: nn.Sequential,
    data: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn,
    config: SandblasterConfig,
) -> tuple[float, torch.Tensor, SandblasterDone]:
    """The loss and gradient the shards assemble from portions for the first batch at the
    model's parameters (a run of ``steps = 0``), and the coordinator's report: what the
    exactly-once property is tested on (and the split replicas' gradient: ``config.stages``
    and ``config.partitions`` split them)."""
    layers = list(model)
    dtype = next(model.parameters()).dtype
    stage_layers = split_layers(layers, resolve_split_points(layer_sizes(layers), config.stages))
    job = Job(config, layers, stage_layers, dtype, loss_fn, TensorRows(*data))
    vectors: dict[str, torch.Tensor] = {"g": torch.empty(0)}
    done, _ = SandblasterDriver(job, vectors).converse()
    return done.loss, vectors["g"], done


def _trace(rt: Any, shard_refs: tuple, reply: Any, trace: list, pending: dict[int, list]) -> None:
    """Snapshot ``"x"`` after each step: ask the shards when the step's report comes, and
    assemble their replies (each shard answers in order) into ``trace``."""
    if isinstance(reply, ProgressReport) and reply.examples > len(trace) + len(pending):
        pending[reply.examples] = [reply.wall_s, {}]
        for ref in shard_refs:
            rt.tell(ref, VectorSnapshot("x", reply.examples))
    elif isinstance(reply, VectorSlice) and reply.tag in pending:
        pending[reply.tag][1][reply.shard] = reply.values
        while pending and len(pending[min(pending)][1]) == len(shard_refs):
            wall_s, got = pending.pop(min(pending))
            trace.append((wall_s, torch.cat([got[k] for k in range(len(shard_refs))])))


def _drain(rt: Any, shard_refs: tuple, trace: list, pending: dict, timeout: float) -> None:
    """The snapshots still on their way when the run ended (the shards answer in order, so a
    last request to each is answered after them)."""
    for ref in shard_refs:
        for reply in rt.converse(ref, VectorSnapshot("d", -2), timeout=timeout):
            if isinstance(reply, VectorSlice) and reply.tag == -2:
                break
            _trace(rt, shard_refs, reply, trace, pending)
