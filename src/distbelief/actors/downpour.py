"""The Downpour master: starts replicas (after the warmstart), watches progress, evaluates,
and assembles the final parameters from the shards."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..messages import (
    ActorRestarted,
    Begin,
    BufferSnapshot,
    CheckpointMarked,
    CheckpointRequest,
    ConnectMaster,
    DataPosition,
    Diverged,
    Progress,
    ProgressReport,
    ReplicaDone,
    ShardSnapshot,
    ShardStateReply,
    ShardStats,
    Snapshot,
    StageBuffers,
    StartReplica,
    StatsRequest,
    TrainingDone,
    WarmstartDone,
)
from ..runtime.base import Actor, receives

Buffers = dict[int, dict[str, torch.Tensor]]
"""Module buffers of replica 0's stages: stage index -> buffer name -> tensor."""
Evaluator = Callable[[torch.Tensor, Buffers], dict[str, float]]
"""Maps a flat parameter vector and replica 0's buffers to metrics such as
``{"loss": ..., "accuracy": ...}``."""

FINAL = -1  # snapshot tag of the final parameter collection
DIVERGED_WINDOW = 8
"""Steps of a replica over which most losses being NaN or Inf means the run diverged."""


class DownpourMaster(Actor):
    """Coordinates one Downpour SGD run. Steppable: every decision is one message handler.

    With a ``checkpointer`` it takes a checkpoint every ``checkpoint_every`` steps (over all
    replicas, seen at their progress reports) and one at the end: it asks every data shard
    for its replica's position, then, with every position and every stage's mark in, every
    shard for its state (see ``CheckpointRequest``), and hands the lot to the checkpointer,
    which writes it while training goes on. ``resumed`` (``examples``, ``steps``) is what a
    checkpoint resumed from had done already: the progress counts and schedules carry on
    from there.
    """

    def __init__(
        self,
        replicas: int,
        warmstart_steps: int,
        total_examples: int,
        evaluator: Evaluator | None,
        eval_every: int,
        report_every_examples: int,
        eval_pauses_training: bool = True,
        checkpointer: Any = None,
        checkpoint_every: int = 0,
        resumed: Mapping[str, int] | None = None,
        checkpoint_marks: int = 0,
    ) -> None:
        self.replicas = replicas
        self.warmstart_steps = warmstart_steps
        self.total_examples = total_examples
        self.evaluator = evaluator
        self.eval_every = eval_every  # in training examples over all replicas; 0 = at the end
        self.report_every_examples = report_every_examples
        # In one thread evaluation pauses training, so its time is not training time; where
        # replicas run in parallel with the master it is, and is not subtracted.
        self.eval_pauses_training = eval_pauses_training
        self.data_shards: tuple = ()
        self.shards: tuple = ()
        self.driver = None
        self.started: set[int] = set()
        self.done: dict[int, ReplicaDone] = {}
        self.examples = self.steps = 0
        self.window_loss = 0.0
        self.window_steps = 0
        self.next_report = report_every_examples
        self.next_eval = eval_every if eval_every > 0 else None
        self.eval_tag = 0
        self.snapshots: dict[int, dict[int, ShardSnapshot]] = {}  # tag -> shard -> reply
        self.buffers: dict[int, Buffers] = {}  # tag -> stage -> buffers (evaluations only)
        self.buffer_stages: tuple = ()
        self.history: dict[str, list] = {"train": [], "eval": []}
        self.t0 = 0.0
        self.t_end = 0.0
        self.eval_s = 0.0
        self.restarts = 0  # actors the runtime respawned (ActorRestarted)
        # Per replica, for the driver's live view and run log (ProgressReport).
        self.replica_steps = [0] * replicas
        self.replica_examples = [0] * replicas
        self.replica_window = [[0.0, 0] for _ in range(replicas)]  # loss sum, steps
        self.shard_stats: dict[int, dict[str, Any]] = {}  # the latest ShardStats, by shard
        self.nonfinite_steps = 0  # steps whose loss was NaN or Inf (their pushes rejected)
        self.recent: dict[int, deque[tuple[int, int]]] = {}  # replica -> (steps, non-finite)
        self.diverged = False
        # Resumed: count on from the checkpoint's examples and steps.
        resumed = resumed or {}
        self.examples = int(resumed.get("examples", 0))
        self.steps = int(resumed.get("steps", 0))
        while self.next_report <= self.examples:
            self.next_report += report_every_examples
        while self.next_eval is not None and self.next_eval <= self.examples:
            self.next_eval += eval_every
        self.checkpointer = checkpointer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_marks = checkpoint_marks  # CheckpointMarked per checkpoint (segments)
        self.marks: dict[int, int] = {}  # tag -> marks received
        self.next_checkpoint = self.steps + checkpoint_every
        self.checkpoint_tag = 0
        self.positions: dict[int, dict[int, DataPosition]] = {}  # tag -> replica -> position
        self.states: dict[int, dict[int, Any]] = {}  # tag -> shard -> ShardState
        self.final_tag: int | None = None  # the end-of-run checkpoint's tag
        self.training_done: TrainingDone | None = None  # held until the final one is written

    @receives(ConnectMaster)
    def on_connect(self, msg: ConnectMaster, sender: object) -> None:
        self.data_shards, self.shards = msg.data_shards, msg.shards
        self.buffer_stages = msg.buffer_stages

    @receives(Begin)
    def on_begin(self, msg: Begin, sender: object) -> None:
        self.driver = sender
        self.t0 = time.perf_counter()
        if self.warmstart_steps > 0:
            self._start(0, self.warmstart_steps)  # replica 0 alone first, as in the paper
        else:
            for r in range(self.replicas):
                self._start(r)

    def _start(self, replica: int, warmstart_steps: int = 0) -> None:
        if replica not in self.started:
            self.started.add(replica)
            self.ctx.tell(self.data_shards[replica], StartReplica(warmstart_steps))

    def _unleash(self) -> None:
        for r in range(self.replicas):
            self._start(r)

    @receives(WarmstartDone)
    def on_warmstart_done(self, msg: WarmstartDone, sender: object) -> None:
        self._unleash()

    def _wall(self) -> float:
        return time.perf_counter() - self.t0 - self.eval_s

    @receives(Progress)
    def on_progress(self, msg: Progress, sender: object) -> None:
        self.examples += msg.examples
        self.steps += msg.steps
        self.nonfinite_steps += msg.nonfinite_steps
        # A bad batch now and then is counted (its push rejected); most of a replica's last
        # DIVERGED_WINDOW steps or more is divergence.
        recent = self.recent.setdefault(msg.replica, deque())
        recent.append((msg.steps, msg.nonfinite_steps))
        while len(recent) > 1 and sum(s for s, _ in recent) - recent[0][0] >= DIVERGED_WINDOW:
            recent.popleft()
        steps, bad = sum(s for s, _ in recent), sum(b for _, b in recent)
        if bad >= 2 and 2 * bad > steps:
            self._diverge(
                f"{bad} of replica {msg.replica}'s last {steps} steps had a NaN or Inf loss "
                f"(at {self.examples:,} examples)"
            )
            return
        self.window_loss += msg.loss_sum
        self.window_steps += msg.steps - msg.nonfinite_steps
        r = msg.replica
        self.replica_steps[r] += msg.steps
        self.replica_examples[r] += msg.examples
        self.replica_window[r][0] += msg.loss_sum
        self.replica_window[r][1] += msg.steps - msg.nonfinite_steps
        if self.examples >= self.next_report or self.examples == self.total_examples:
            loss = self.window_loss / max(self.window_steps, 1)
            self.history["train"].append(
                {"examples": self.examples, "wall_s": self._wall(), "loss": loss}
            )
            self.ctx.tell(self.driver, self._report(loss))
            self.window_loss, self.window_steps = 0.0, 0
            for window in self.replica_window:
                window[0], window[1] = 0.0, 0
            for shard in self.shards:  # their replies ride on the next report
                self.ctx.tell(shard, StatsRequest())
            if self.checkpointer is not None and self.shard_stats:
                self.checkpointer.note_progress(
                    sum(int(s["updates_applied"]) for s in self.shard_stats.values())
                )
            while self.next_report <= self.examples:
                self.next_report += self.report_every_examples
        if self.checkpoint_every and self.steps >= self.next_checkpoint:
            while self.next_checkpoint <= self.steps:
                self.next_checkpoint += self.checkpoint_every
            if len(self.positions) < 2:  # (one lost with a dead stage is dropped later)
                self._checkpoint()
        if self.next_eval is not None and self.examples >= self.next_eval:
            while self.next_eval <= self.examples:
                self.next_eval += self.eval_every
            if self.evaluator is not None and self.examples < self.total_examples:
                self.eval_tag += 1
                self._snapshot(self.eval_tag)

    def _report(self, loss: float, evaluation: dict[str, float] | None = None) -> ProgressReport:
        return ProgressReport(
            self.examples,
            self.total_examples,
            loss,
            self._wall(),
            tuple(self.replica_steps),
            tuple(self.replica_examples),
            tuple(w[0] / w[1] if w[1] else None for w in self.replica_window),
            tuple(self.shard_stats[k] for k in sorted(self.shard_stats)),
            evaluation,
        )

    @receives(ShardStats)
    def on_shard_stats(self, msg: ShardStats, sender: object) -> None:
        self.shard_stats[msg.shard] = {**msg.stats, "wall_s": self._wall()}

    def _snapshot(self, tag: int) -> None:
        self.snapshots[tag] = {}
        for shard in self.shards:
            self.ctx.tell(shard, Snapshot(tag))
        if tag != FINAL:  # the final buffers come with ReplicaDone
            self.buffers[tag] = {}
            for stage in self.buffer_stages:
                self.ctx.tell(stage, BufferSnapshot(tag))

    @receives(ActorRestarted)
    def on_actor_restarted(self, msg: ActorRestarted, sender: object) -> None:
        # A runtime respawned a dead actor: count it, and let each data shard resume its
        # replica if the actor was one of its stages (the one that was, resends its mini-batch).
        self.restarts += 1
        for data_shard in self.data_shards:
            self.ctx.tell(data_shard, msg)
        # A checkpoint still waiting for marks may wait forever (the dead stage's are lost):
        # start it again under a new tag, whose marks cannot be mistaken for the old ones.
        for tag in list(self.marks):
            del self.marks[tag], self.positions[tag], self.states[tag]
            again = self._checkpoint()
            if tag == self.final_tag:
                self.final_tag = again

    @receives(ReplicaDone)
    def on_replica_done(self, msg: ReplicaDone, sender: object) -> None:
        self.done[msg.replica] = msg
        self._unleash()  # a warmstart longer than replica 0's run ends the warmstart too
        if len(self.done) == self.replicas:
            self.t_end = time.perf_counter()
            self._snapshot(FINAL)

    @receives(ShardSnapshot)
    def on_shard_snapshot(self, msg: ShardSnapshot, sender: object) -> None:
        self.snapshots[msg.tag][msg.shard] = msg
        if msg.tag != FINAL:
            self.shard_stats[msg.shard] = {**msg.stats, "wall_s": self._wall()}
        self._collected(msg.tag)

    @receives(StageBuffers)
    def on_stage_buffers(self, msg: StageBuffers, sender: object) -> None:
        self.buffers[msg.tag][msg.stage] = msg.buffers
        self._collected(msg.tag)

    def _collected(self, tag: int) -> None:
        """Evaluate, or finish, once every reply for ``tag`` is in."""
        got = self.snapshots[tag]
        if len(got) < len(self.shards):
            return
        if tag != FINAL and len(self.buffers[tag]) < len(self.buffer_stages):
            return
        del self.snapshots[tag]
        weights = torch.cat([got[k].weights for k in range(len(self.shards))])
        if tag != FINAL:
            self._evaluate(weights, self.buffers.pop(tag))
            return
        # The final evaluation is the driver's, on the returned model (with replica 0's buffers).
        examples = sum(d.examples for d in self.done.values())
        self.training_done = TrainingDone(
            weights=weights,
            shard_stats=tuple(got[k].stats for k in range(len(self.shards))),
            buffers=self.done[0].buffers,
            history=self.history,
            train_s=self.t_end - self.t0 - self.eval_s,
            eval_s=self.eval_s,
            examples=examples,
            steps=sum(d.steps for d in self.done.values()),
            restarts=self.restarts,
            nonfinite_steps=self.nonfinite_steps,
        )
        if self.checkpointer is not None and not self.diverged:
            self.final_tag = self._checkpoint()  # TrainingDone goes once it is written
        else:
            self._finish()

    def _finish(self) -> None:
        done = self.training_done
        if self.checkpointer is not None:
            self.checkpointer.join()
            done = dataclasses.replace(done, checkpoints=self.checkpointer.stats)
        self.ctx.tell(self.driver, done)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self) -> int:
        """Ask every data shard for its position (the shards are asked once all are in)."""
        self.checkpoint_tag += 1
        tag = self.checkpoint_tag
        self.positions[tag], self.states[tag], self.marks[tag] = {}, {}, 0
        for data_shard in self.data_shards:
            self.ctx.tell(data_shard, CheckpointRequest(tag))
        return tag

    @receives(DataPosition)
    def on_data_position(self, msg: DataPosition, sender: object) -> None:
        if msg.tag in self.positions:
            self.positions[msg.tag][msg.replica] = msg
            self._ask_shards(msg.tag)

    @receives(CheckpointMarked)
    def on_checkpoint_marked(self, msg: CheckpointMarked, sender: object) -> None:
        if msg.tag in self.marks:
            self.marks[msg.tag] += 1
            self._ask_shards(msg.tag)

    def _ask_shards(self, tag: int) -> None:
        """Once every position and every mark is in, every push before those positions has
        been applied (see CheckpointRequest): now the shards' states are taken."""
        if len(self.positions[tag]) == self.replicas and self.marks[tag] == self.checkpoint_marks:
            del self.marks[tag]
            for shard in self.shards:
                self.ctx.tell(shard, CheckpointRequest(tag))

    @receives(ShardStateReply)
    def on_shard_state(self, msg: ShardStateReply, sender: object) -> None:
        got = self.states.get(msg.tag)
        if got is None:
            return  # a superseded checkpoint's (dropped below)
        got[msg.shard] = msg.state
        if len(got) < len(self.shards):
            return
        positions = self.positions.pop(msg.tag)
        del self.states[msg.tag]
        for older in [t for t in self.positions if t < msg.tag and t != self.final_tag]:
            # superseded (its marks lost with a stage that died): forget it
            del self.positions[older], self.states[older]
            self.marks.pop(older, None)
        final = msg.tag == self.final_tag
        if self.diverged and not final:
            return  # never replace the last good checkpoint with a diverged state
        shards = [got[k] for k in range(len(self.shards))]
        update = sum(int(s.counters["updates_applied"]) for s in shards)
        where = {
            r: {"epoch": p.epoch, "step": p.step, "steps": p.steps, "examples": p.examples}
            for r, p in sorted(positions.items())
        }
        # The final one is written before the driver hears the run is done; the others in
        # the background while training goes on.
        self.checkpointer.submit(update, shards, where, wait=final)
        if final:
            self._finish()

    def _diverge(self, reason: str) -> None:
        """Tell the driver, once; it stops the run and keeps what it can."""
        if not self.diverged:
            self.diverged = True
            self.ctx.tell(self.driver, Diverged(reason))

    def _evaluate(self, weights: torch.Tensor, buffers: Buffers) -> None:
        t = time.perf_counter()
        metrics = self.evaluator(weights, buffers)
        if not math.isfinite(metrics["loss"]):
            self._diverge(
                f"the evaluation loss was {metrics['loss']} at {self.examples:,} examples"
            )
        self.history["eval"].append({"examples": self.examples, "wall_s": self._wall(), **metrics})
        if self.eval_pauses_training:
            self.eval_s += time.perf_counter() - t
        last = self.history["train"][-1]["loss"] if self.history["train"] else float("nan")
        self.ctx.tell(self.driver, self._report(last, dict(metrics)))
