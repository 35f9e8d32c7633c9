"""The Downpour master: starts replicas (after the warmstart), watches progress, evaluates,
and assembles the final parameters from the shards."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...results import ProgressReport
from ...runtime.base import Actor, ActorRestarted, receives
from ..messages import Begin
from .checkpoints import CheckpointCoordinator, StopCheckpoint
from .data_shard import DataShard
from .messages import (
    BufferSnapshot,
    CheckpointMarked,
    ConnectMaster,
    DataPosition,
    DataUnreadable,
    Diverged,
    Progress,
    ReplicaDone,
    ReplicaStatus,
    ResumeReplica,
    SegmentCopy,
    ShardSnapshot,
    ShardStateReply,
    ShardStats,
    Snapshot,
    StageBuffers,
    StartReplica,
    StatsRequest,
    StatusRequest,
    TrainingDone,
    WarmstartDone,
)
from .progress import DivergenceWatch
from .shard_recovery import ShardRecovery

Buffers = dict[int, dict[str, torch.Tensor]]
"""Module buffers of replica 0's stages: stage index -> buffer name -> tensor."""
Evaluator = Callable[[torch.Tensor, Buffers], dict[str, float]]
"""Maps a flat parameter vector and replica 0's buffers to metrics such as
``{"loss": ..., "accuracy": ...}``."""

FINAL = -1  # snapshot tag of the final parameter collection


class DownpourMaster(Actor):
    """Coordinates one Downpour SGD run. Steppable: every decision is one message handler.

    With a ``checkpointer`` it takes a checkpoint every ``checkpoint_every`` steps (over all
    replicas, seen at their progress reports) and one at the end, through the
    ``checkpoints`` it owns (``checkpoints.CheckpointCoordinator``: the rounds of positions,
    marks and shard states, and the checkpointer's writes). ``resumed`` (``examples``,
    ``steps``) is what a checkpoint resumed from had done already: the progress counts and
    schedules carry on from there.

    It also recovers what a runtime restarts (``ActorRestarted``): a parameter shard through
    the ``shard_recovery`` it owns (``shard_recovery.ShardRecovery``: from the newest copies
    of its segments the replicas' stages hold, or the newest checkpoint in ``checkpoint_dir``
    where that is newer); a data shard from the steps its replica reported; and itself
    (restartable), from what the data shards and shards report: each replica's steps,
    examples and whether it is done, and the shards' counters. A restarted master's history
    (loss curve, evaluations) starts at its restart, and its training time is counted from
    then.
    """

    restartable = True

    def __init__(
        self,
        replicas: int,
        warmstart_steps: int,
        total_examples: int,
        evaluator: Evaluator | None,
        eval_every: int,
        report_every_examples: int,
        eval_pauses_training: bool = True,
        checkpoint_dir: str | None = None,
        checkpointer: Any = None,
        checkpoint_every: int = 0,
        resumed: Mapping[str, int] | None = None,
        checkpoint_marks: int = 0,
        segment_positions: Mapping[int, Mapping[int, tuple[tuple[int, int], ...]]] | None = None,
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
        self.divergence = DivergenceWatch()
        self.diverged = False
        self.stages: tuple[tuple, ...] = ()  # stages[replica][stage]
        self.recoveries: list[dict[str, Any]] = []  # one record per actor recovered
        self.shard_recovery = ShardRecovery(
            self._tell, checkpoint_dir, self.shard_stats, segment_positions
        )
        self.step_base = [0] * replicas  # each data shard's step numbering base
        self.status_in: set[int] = set()  # a restarted master: replicas that reported
        self.warm_steps_done = 0  # a restarted master: replica 0's steps, as it last said
        # Resumed: count on from the checkpoint's examples and steps.
        resumed = resumed or {}
        self.examples = int(resumed.get("examples", 0))
        self.steps = int(resumed.get("steps", 0))
        self.resumed_examples, self.resumed_steps = self.examples, self.steps  # (recovery)
        while self.next_report <= self.examples:
            self.next_report += report_every_examples
        while self.next_eval is not None and self.next_eval <= self.examples:
            self.next_eval += eval_every
        self.checkpoints = CheckpointCoordinator(
            self._tell, checkpointer, checkpoint_every, checkpoint_marks, replicas, self.steps
        )
        self.training_done: TrainingDone | None = None  # held until the final one is written

    @receives(ConnectMaster)
    def on_connect(self, msg: ConnectMaster, sender: object) -> None:
        self.data_shards, self.shards = msg.data_shards, msg.shards
        self.buffer_stages = msg.buffer_stages
        self.stages = msg.stages
        self.checkpoints.connect(msg.data_shards, msg.shards)
        self.shard_recovery.connect(msg.shards, msg.stages)

    def _tell(self, ref: object, message: object) -> None:
        """How the helpers this master owns send (through its context, once it is bound)."""
        self.ctx.tell(ref, message)

    @receives(Begin)
    def on_begin(self, msg: Begin, sender: object) -> None:
        self.driver = sender
        self.t0 = time.perf_counter()
        self._begin()

    def _begin(self) -> None:
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

    @receives(DataUnreadable)
    def on_data_unreadable(self, msg: DataUnreadable, sender: object) -> None:
        self.ctx.tell(self.driver, msg)  # the driver stops the run and keeps what it can

    @receives(WarmstartDone)
    def on_warmstart_done(self, msg: WarmstartDone, sender: object) -> None:
        if self._known(msg.replica):
            self._unleash()

    def _known(self, replica: int) -> bool:
        """Whether this master counts the replica's messages: always, unless it is a
        restarted master that has not had the replica's ``ReplicaStatus`` yet (which covers
        every message the data shard sent before it)."""
        return not self.restarted or replica in self.status_in

    def _wall(self) -> float:
        return time.perf_counter() - self.t0 - self.eval_s

    @receives(Progress)
    def on_progress(self, msg: Progress, sender: object) -> None:
        if not self._known(msg.replica):
            return
        self.examples += msg.examples
        self.steps += msg.steps
        self.nonfinite_steps += msg.nonfinite_steps
        diverged = self.divergence.add(msg.replica, msg.steps, msg.nonfinite_steps)
        if diverged is not None:
            bad, steps = diverged
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
            self._report_progress()
        self.checkpoints.on_steps(self.steps, running=self.examples < self.total_examples)
        if self.next_eval is not None and self.examples >= self.next_eval:
            while self.next_eval <= self.examples:
                self.next_eval += self.eval_every
            if self.evaluator is not None and self.examples < self.total_examples:
                self.eval_tag += 1
                self._snapshot(self.eval_tag)

    def _report_progress(self) -> None:
        """Tell the driver the loss over the window since the last report (and per replica),
        and ask the shards for their counters, which ride on the next report."""
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
        if self.shard_stats:
            self.checkpoints.note_progress(
                sum(int(s["updates_applied"]) for s in self.shard_stats.values())
            )
        while self.next_report <= self.examples:
            self.next_report += self.report_every_examples

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
        if msg.stats.get("awaiting_restore"):
            # A restarted shard whose restore was lost with an earlier life of this master.
            if msg.shard not in self.shard_recovery.begun:  # (else: asked before its restore)
                self._recover_shard(msg.shard)
            return
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
        # A runtime respawned a dead actor: count it and recover it. A checkpoint round that
        # waits on what the dead actor would have sent is started again.
        self.restarts += 1
        if msg.name == self.ctx.name:
            self._recover_master(sender)
        elif msg.ref in self.shards:
            k = self.shards.index(msg.ref)
            self._recover_shard(k)
            self.checkpoints.restart(shard=k)
        elif msg.ref in self.data_shards:
            self._recover_data_shard(self.data_shards.index(msg.ref), msg.ref)
            self.checkpoints.restart()
        else:
            self._recover_stage(msg)
            self.checkpoints.restart()

    # -------------------------------------------------------------- recovery

    def _recover_shard(self, k: int) -> None:
        """Recover shard ``k`` (``shard_recovery``); a snapshot asked of its dead life is
        asked of the new one (it answers once restored)."""
        self.shard_recovery.begin(k)
        for tag, got in self.snapshots.items():
            if k not in got:
                self.ctx.tell(self.shards[k], Snapshot(tag))
        self._recovered(self.shard_recovery.restore_if_complete(k))

    @receives(SegmentCopy)
    def on_segment_copy(self, msg: SegmentCopy, sender: object) -> None:
        self._recovered(self.shard_recovery.on_copy(msg))

    def _recovered(self, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.recoveries.append(record)

    def _recover_data_shard(self, r: int, ref: object) -> None:
        """Replica ``r``'s data shard (at ``ref``) was restarted: resume it where the replica
        was, or, if this restarted master does not know that yet, let it start over."""
        if self._known(r):
            self._resume_replica(r)  # before a checkpoint asks it for its position
        else:  # this restarted master's StatusRequest died with it: ask the new one
            self.ctx.tell(ref, StatusRequest())  # (what it had done is lost: redone)
            self.recoveries.append(
                {"actor": f"data{r}", "resumed_at_step": 0, "source": "none: starts over"}
            )

    def _recover_stage(self, msg: ActorRestarted) -> None:
        """A stage was restarted: a shard's recovery waiting on it asks its new life, and so
        does an evaluation waiting for its buffers; each data shard resumes its replica if
        the stage was one of its own (it resends its mini-batch)."""
        self.shard_recovery.on_stage_restarted(msg.ref)
        if msg.ref in self.buffer_stages:
            s = self.stages[0].index(msg.ref)
            for tag, got in self.buffers.items():
                if s not in got:
                    self.ctx.tell(msg.ref, BufferSnapshot(tag))
        for data_shard in self.data_shards:
            self.ctx.tell(data_shard, msg)

    def _resume_replica(self, r: int) -> None:
        """A data shard was restarted: resume it at the steps its replica reported."""
        if r not in self.started or r in self.done:
            return  # not started: StartReplica will come; done: nothing is left for it
        self.step_base[r] += DataShard.STEP_BASE
        warmstart = self.warmstart_steps if r == 0 and len(self.started) < self.replicas else 0
        if warmstart and self.replica_steps[0] >= warmstart:
            self._unleash()  # its WarmstartDone may have been lost with it
            warmstart = 0
        self.ctx.tell(
            self.data_shards[r],
            ResumeReplica(
                self.replica_steps[r], self.replica_examples[r], self.step_base[r], warmstart
            ),
        )
        self.recoveries.append(
            {"actor": f"data{r}", "resumed_at_step": self.replica_steps[r], "source": "master"}
        )

    def _recover_master(self, driver: object) -> None:
        """This master is a restarted one: learn where every replica is (``ReplicaStatus``)."""
        self.driver = driver  # the runtime's notice comes from the driver
        self.t0 = time.perf_counter()
        for data_shard in self.data_shards:
            self.ctx.tell(data_shard, StatusRequest())
        for shard in self.shards:
            self.ctx.tell(shard, StatsRequest())
        self.recoveries.append({"actor": "master", "source": "data shards and shards"})

    @receives(ReplicaStatus)
    def on_replica_status(self, msg: ReplicaStatus, sender: object) -> None:
        r = msg.replica
        if r in self.status_in:
            return
        self.status_in.add(r)
        self.step_base[r] = msg.step_base
        if msg.started:
            self.started.add(r)
        self.replica_steps[r], self.replica_examples[r] = msg.steps, msg.examples
        if msg.done is not None:
            self.done[r] = msg.done
        if r == 0:
            self.warm_steps_done = msg.steps_done
        if len(self.status_in) < self.replicas:
            return
        self.examples = self.resumed_examples + sum(self.replica_examples)
        self.steps = self.resumed_steps + sum(self.replica_steps)
        every = self.report_every_examples
        self.next_report = (self.examples // every + 1) * every
        if self.eval_every > 0:
            self.next_eval = (self.examples // self.eval_every + 1) * self.eval_every
        if not self.started:
            self._begin()  # it died before Begin, or with it
        elif len(self.started) < self.replicas and (
            self.started != {0}  # others run: the warmstart is over (replica 0 started over)
            or self.warm_steps_done >= self.warmstart_steps
            or 0 in self.done
        ):
            self._unleash()  # the warmstart ended, its WarmstartDone lost with the master
        if len(self.done) == self.replicas:
            self.t_end = time.perf_counter()
            self._snapshot(FINAL)

    @receives(ReplicaDone)
    def on_replica_done(self, msg: ReplicaDone, sender: object) -> None:
        if not self._known(msg.replica) or msg.replica in self.done:
            return
        self.done[msg.replica] = msg
        self._unleash()  # a warmstart longer than replica 0's run ends the warmstart too
        if len(self.done) == self.replicas:
            self.t_end = time.perf_counter()
            self._snapshot(FINAL)

    @receives(ShardSnapshot)
    def on_shard_snapshot(self, msg: ShardSnapshot, sender: object) -> None:
        if msg.tag not in self.snapshots:
            return  # asked by this master's earlier life, or answered twice after a restart
        self.snapshots[msg.tag][msg.shard] = msg
        if msg.tag != FINAL:
            self.shard_stats[msg.shard] = {**msg.stats, "wall_s": self._wall()}
        self._collected(msg.tag)

    @receives(StageBuffers)
    def on_stage_buffers(self, msg: StageBuffers, sender: object) -> None:
        if msg.tag not in self.buffers:
            return  # asked by this master's earlier life
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
            recoveries=tuple(self.recoveries),
            crossed_bytes=sum(d.crossed_bytes for d in self.done.values()),
        )
        if self.checkpoints.enabled and not self.diverged:
            self.checkpoints.start_final()  # TrainingDone goes once it is written
        else:
            self._finish()

    def _finish(self) -> None:
        self.ctx.tell(self.driver, self.checkpoints.finish(self.training_done))

    # ------------------------------------------------------------------ checkpoints

    @receives(DataPosition)
    def on_data_position(self, msg: DataPosition, sender: object) -> None:
        self.checkpoints.on_position(msg)

    @receives(CheckpointMarked)
    def on_checkpoint_marked(self, msg: CheckpointMarked, sender: object) -> None:
        self.checkpoints.on_marked(msg)

    @receives(StopCheckpoint)
    def on_stop_checkpoint(self, msg: StopCheckpoint, sender: object) -> None:
        self.checkpoints.start_stop(sender)  # the driver, after a stop signal

    @receives(ShardStateReply)
    def on_shard_state(self, msg: ShardStateReply, sender: object) -> None:
        if self.checkpoints.on_shard_state(msg, diverged=self.diverged):
            self._finish()  # the final checkpoint is written

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
