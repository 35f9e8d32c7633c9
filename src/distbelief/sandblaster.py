"""Wiring a Sandblaster L-BFGS run: spawn the shards, the replicas and the coordinator, run
until the coordinator reports, collect the parameters from the shards, build the result.
``api.train`` checks the inputs and hands over here."""

from __future__ import annotations

import copy
import signal
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .actors import Coordinator, SandblasterReplica, SandblasterShard
from .api import Evaluator, History, LossFn, TrainResult, _assemble
from .config import SandblasterConfig
from .errors import ConfigError, TrainingInterrupted
from .flat import flatten
from .layout import shard_ranges
from .lbfgs import Settings
from .messages import (
    Begin,
    ConnectSandblaster,
    ProgressReport,
    SandblasterDone,
    VectorSlice,
    VectorSnapshot,
)
from .portions import batch_size_of
from .runtime import make_runtime

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


def run(
    config: SandblasterConfig,
    layers: list[nn.Module],
    dtype: torch.dtype,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    evaluator: Evaluator | None,
    progress: Callable[[ProgressReport], None] | None,
) -> TrainResult:
    """Run Sandblaster L-BFGS with a checked ``config`` and return the result."""
    own, runtime_options = split_options(config)
    portions = config.portion_count
    batch_examples = batch_size_of(len(x), config.batch_size)
    if portions > batch_examples:
        raise ConfigError(
            f"portions: {portions} portions but a batch has {batch_examples} examples"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        trace: list[tuple[float, torch.Tensor]] | None = [] if own.get("eval_steps") else None
        walls: list[float] = []  # seconds since the start at the end of each step

        def report(msg: ProgressReport) -> None:
            walls.append(msg.wall_s)
            if progress is not None:
                progress(msg)

        done, weights, runtime_stats = _run(
            config, own, runtime_options, layers, dtype, loss_fn, x, y, report, trace=trace
        )
    stage_layers = [layers]
    result_model = _assemble(stage_layers, weights, ({},))
    history = History(
        train=[
            {"examples": (i + 1) * batch_examples, "wall_s": wall_s, "loss": loss}
            for i, (loss, wall_s) in enumerate(zip(done.losses, walls, strict=True))
        ]
    )
    if evaluator is not None and trace:
        for step, (wall_s, point) in enumerate(trace, 1):
            metrics = evaluator(point)
            history.eval.append({"examples": step * batch_examples, "wall_s": wall_s, **metrics})
    if evaluator is not None:
        final = evaluator.evaluate(result_model)
        history.eval.append({"examples": done.examples, "wall_s": done.train_s, **final})
    stats = {
        "steps": done.steps,
        "function_evals": done.function_evals,
        "stop": done.stop,
        "final_loss": done.loss,
        "portions": portions,
        "portions_done": list(done.portions_done),
        "portions_computed": list(done.portions_computed),
        "backup_portions": done.backup_portions,
        "backup_wins": done.backup_wins,
        "duplicates_dropped": done.duplicates_dropped,
        "reassigned": done.reassigned,
        "coordinator_bytes": done.coordinator_bytes,
        "coordinator_messages": done.coordinator_messages,
        "parameters": int(weights.numel()),
        "examples": done.examples,
        "train_s": done.train_s,
        "examples_per_s": done.examples / done.train_s if done.train_s > 0 else float("nan"),
        "seed": config.seed,
        "restarts": done.restarts,
        **runtime_stats,
    }
    return TrainResult(result_model, history, stats, config)


def _run(
    config: SandblasterConfig,
    own: dict[str, Any],
    runtime_options: dict[str, Any],
    layers: list[nn.Module],
    dtype: torch.dtype,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    progress: Callable[[ProgressReport], None] | None,
    vectors: dict[str, torch.Tensor] | None = None,
    trace: list[tuple[float, torch.Tensor]] | None = None,
) -> tuple[SandblasterDone, torch.Tensor, dict[str, Any]]:
    """Spawn and wire every actor, run until the coordinator reports, collect ``"x"`` (and
    the vectors named in ``vectors``, into it), always shut down."""
    initial = flatten(layers).to(dtype)
    slices = shard_ranges(initial.numel(), config.shards)
    rt = make_runtime(config.runtime, seed=config.seed, **runtime_options)
    try:
        shard_refs = tuple(
            rt.spawn(f"shard{k}", SandblasterShard, k, initial[a:b])
            for k, (a, b) in enumerate(slices)
        )
        slow = own.get("slow_replicas", {})
        names = tuple(f"replica{r}" for r in range(config.replicas))
        replica_refs = tuple(
            rt.spawn(
                names[r],
                SandblasterReplica,
                r,
                copy.deepcopy(layers),
                loss_fn,
                x,
                y,
                slices,
                config.batch_size,
                config.portion_count,
                config.seed,
                config.push_every,
                float(slow.get(r, 1.0)),
                rt.single_threaded,
            )  # fmt: skip
            for r in range(config.replicas)
        )
        coordinator = rt.spawn(
            "coordinator",
            Coordinator,
            settings_of(config, dtype == torch.float64),
            config.replicas,
            config.portion_count,
            batch_size_of(len(x), config.batch_size),
            bool(own.get("backup_tasks", True)),
            bool(own.get("duplicate_portions", False)),
            names,
        )
        wiring = ConnectSandblaster(shard_refs, replica_refs, coordinator)
        rt.tell(coordinator, wiring)
        for ref in replica_refs:
            rt.tell(ref, wiring)
        pending: dict[int, list] = {}  # step -> (wall_s, slices so far), for ``trace``
        try:
            for reply in rt.converse(coordinator, Begin(), timeout=config.timeout_s):
                if isinstance(reply, SandblasterDone):
                    if trace is not None and pending:
                        _drain(rt, shard_refs, trace, pending, config.timeout_s)
                    weights = collect(rt, shard_refs, "x")
                    for name in vectors or {}:
                        vectors[name] = collect(rt, shard_refs, name)
                    describe = getattr(rt, "describe", None)
                    return reply, weights, (describe() if describe is not None else {})
                if progress is not None and isinstance(reply, ProgressReport):
                    progress(reply)
                if trace is not None:
                    _trace(rt, shard_refs, reply, trace, pending)
        except KeyboardInterrupt as stop:
            weights = collect(rt, shard_refs, "x")
            model = _assemble([layers], weights, ({},))
            raise TrainingInterrupted(model, getattr(stop, "signum", signal.SIGINT)) from None
        raise RuntimeError("the runtime stopped without a result")  # pragma: no cover
    finally:
        rt.shutdown()


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
    exactly-once property is tested on."""
    layers = list(model)
    dtype = next(model.parameters()).dtype
    own, runtime_options = split_options(config)
    vectors: dict[str, torch.Tensor] = {"g": torch.empty(0)}
    done, _, _ = _run(config, own, runtime_options, layers, dtype, loss_fn, *data, None, vectors)
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
