"""DataShard: one replica's part of the training set; feeds its first stage mini-batches."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ...data.formats import DataFileChanged
from ...data.inputs import epoch_order
from ...runtime.base import Actor, ActorRestarted, receives
from .messages import (
    CheckpointMark,
    CheckpointRequest,
    ConnectDataShard,
    DataPosition,
    DataUnreadable,
    Finish,
    Forward,
    Progress,
    ReplicaDone,
    ReplicaStatus,
    ResumeReplica,
    StageDone,
    StartReplica,
    StatusRequest,
    StepDone,
    WarmstartDone,
)


class DataShard(Actor):
    """Owns the replica's examples, reshuffles them each epoch (seeded), counts epochs.

    ``rows`` is its part of the data: in-memory tensors (``data.TensorRows``, gathered once
    per epoch) or a file (``data.formats.FileData``), which it reads itself, one mini-batch at a
    time, in the process it runs in.

    Up to ``pipeline_depth`` mini-batches are in flight at a time (1: one, as in the seed):
    the next is sent when the first stage reports a step's backward pass done, so with more
    than one stage s works on one while stage s+1 works on an earlier one (see
    docs/pipelining.md). Steps are counted as they are reported done, whatever their order;
    the replica finishes once every mini-batch is sent and done. When a runtime restarts one
    of the replica's stages, every mini-batch in flight is sent again, in order (their steps
    redone from fresh parameters), and a step reported twice counts once: the step numbers
    tell the copies apart.

    Resumable: ``start`` (a checkpoint's position for the replica: ``epoch``, ``step`` within
    it, ``steps`` and ``examples`` before it) makes it begin there; its order within an epoch
    is a function of the seed, the replica and the epoch, so the resumed run sees the same
    mini-batches from there on. Asked for a checkpoint, it reports the latest position whose
    every earlier step has been pushed (``n_push``: how often its stages push): with several
    mini-batches in flight, never past the oldest one not yet done.
    Restartable: a respawned data shard waits for the master's ``ResumeReplica`` (or, if its
    replica had not started, ``StartReplica``), which gives it the steps its replica had
    reported; the epoch order being a function of the seed and the epoch, that is its
    position. The steps after the last report are done again. Its steps are numbered from a
    new base, so what its earlier life left in flight through the stages is told apart.
    """

    restartable = True
    STEP_BASE = 1 << 40
    """Step numbers of each life of a data shard start at a multiple of this."""

    def __init__(
        self,
        replica: int,
        rows: Any,
        batch_size: int,
        epochs: int,
        seed: int,
        report_every: int,
        n_push: int = 1,
        start: Mapping[str, int] | None = None,
        pipeline_depth: int = 1,
    ) -> None:
        self.replica = replica
        self.rows = rows
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.report_every = report_every
        self.n_push = n_push
        self.depth = pipeline_depth
        start = start or {}
        self.epoch = int(start.get("epoch", 0))
        self.batch_index = int(start.get("step", 0))  # index of the next mini-batch in the epoch
        self.steps = int(start.get("steps", 0))  # steps done (reported by the first stage)
        self.examples = int(start.get("examples", 0))
        self.start_steps = self.steps  # the stages count their pushes from here
        self.start_examples = self.examples
        self.warmstart_steps = 0
        self.window_steps = self.window_examples = self.window_nonfinite = 0
        self.window_loss = 0.0
        self.stage_buffers: dict[int, dict] = {}
        self.stages: tuple = ()
        self.first: tuple = ()  # where mini-batches go: stage 0, or its partitions
        self.parts = 1  # partitions per stage (``stages`` holds each stage's in turn)
        self.reports: dict[int, set[int]] = {}  # step -> partitions of stage 0 done with it
        self.crossed_bytes = 0
        self.master = None
        self._epoch_batches: Any = []  # a list, or a file's batches read when asked for
        # The mini-batches sent and not yet done, by step, oldest first.
        self._in_flight: dict[int, Forward] = {}
        self.sent = self.steps  # mini-batches sent (Forward.step = step_base + sent)
        self._sent_all = False  # the last epoch's last mini-batch is sent
        self._finishing = False  # Finish sent to the stages
        self._replica_done = False
        self._done_message: ReplicaDone | None = None
        self.started = False
        self.step_base = 0  # Forward.step = step_base + steps (see the class doc)

    @receives(ConnectDataShard)
    def on_connect(self, msg: ConnectDataShard, sender: object) -> None:
        self.stages, self.master = msg.stages, msg.master
        self.first = msg.first or msg.stages[:1]
        self.parts = msg.parts

    @receives(StartReplica)
    def on_start(self, msg: StartReplica, sender: object) -> None:
        if self.started:
            return  # a restarted master does not know who it started: once is enough
        self.started = True
        self.warmstart_steps = msg.warmstart_steps
        if self.epoch >= self.epochs:  # resumed from a checkpoint taken after its last step
            self._finish()
            return
        self._next_batch(shuffle=True)

    @receives(ResumeReplica)
    def on_resume(self, msg: ResumeReplica, sender: object) -> None:
        if self.started:
            return
        self.started = True
        self.warmstart_steps = msg.warmstart_steps
        self.step_base = msg.step_base
        # (the master counts this run's steps; a resumed run began at start_steps)
        self.steps = self.sent = self.start_steps + msg.steps
        self.examples = self.start_examples + msg.examples
        per_epoch = -(-len(self.rows) // self.batch_size)
        self.epoch, self.batch_index = divmod(self.steps, per_epoch)
        if self.epoch >= self.epochs:
            self._finish()
            return
        self._next_batch(shuffle=True)

    @receives(StatusRequest)
    def on_status_request(self, msg: StatusRequest, sender: object) -> None:
        self.ctx.tell(
            sender,
            ReplicaStatus(
                self.replica,
                self.started,
                self.steps - self.start_steps - self.window_steps,  # this run's, reported
                self.examples - self.start_examples - self.window_examples,
                self.step_base,
                self._done_message,
                self.steps,
            ),
        )

    def _next_batch(self, shuffle: bool = False) -> None:
        """Send mini-batches until ``pipeline_depth`` are in flight or the last epoch's are all
        sent (first reading the epoch's order if ``shuffle``, and each next epoch's as it
        begins). A data file changed under the run stops this replica and tells the master, so
        the driver keeps what was trained (an exception here would end the run with nothing
        kept)."""
        try:
            if shuffle:
                self._shuffle()
            while len(self._in_flight) < self.depth and not self._sent_all:
                if self.batch_index == len(self._epoch_batches):
                    self.epoch += 1
                    self.batch_index = 0
                    if self.epoch == self.epochs:
                        self._sent_all = True
                        break
                    self._shuffle()
                self._send_batch()
        except DataFileChanged as exc:
            self.ctx.tell(self.master, DataUnreadable(self.replica, str(exc)))

    def _shuffle(self) -> None:
        order = epoch_order(len(self.rows), self.seed, self.replica, self.epoch)
        self._epoch_batches = self.rows.batches(order, self.batch_size)

    def _send_batch(self) -> None:
        x, y = self._epoch_batches[self.batch_index]
        self.batch_index += 1
        forward = Forward(self.step_base + self.sent, x, y)
        self.sent += 1
        self._in_flight[forward.step] = forward
        for ref in self.first:
            self.ctx.tell(ref, forward)

    @receives(StepDone)
    def on_step_done(self, msg: StepDone, sender: object) -> None:
        if len(self.first) > 1:  # partitions: the step is done when each has said so
            forward = self._in_flight.get(msg.step)
            if forward is None or msg.attempt != forward.attempt:
                return  # of a pass lost with a restarted partition, or counted already
            done = self.reports.setdefault(msg.step, set())
            done.add(msg.block)
            if len(done) < len(self.first):
                return
            del self.reports[msg.step]
        forward = self._in_flight.pop(msg.step, None)
        if forward is None:
            return  # a step redone after a stage restart, reported twice: count it once
        batch = len(forward.activations)
        self.steps += 1
        self.examples += batch
        self.window_steps += 1
        self.window_examples += batch
        if math.isfinite(msg.loss):
            self.window_loss += msg.loss
        else:
            self.window_nonfinite += 1  # its pushes are rejected at the shards; the master judges
        if self.steps == self.warmstart_steps:
            self.ctx.tell(self.master, WarmstartDone(self.replica))
        if self.window_steps == self.report_every:
            self._report()
        self._next_batch()
        if self._sent_all and not self._in_flight:
            self._finish()

    def _finish(self) -> None:
        self._report()
        self._finishing = True
        for stage in self.stages:
            self.ctx.tell(stage, Finish())

    @receives(CheckpointRequest)
    def on_checkpoint_request(self, msg: CheckpointRequest, sender: object) -> None:
        steps = self.steps
        if self._in_flight:  # (done out of order after a restart: not past the oldest left)
            steps = min(steps, min(self._in_flight) - self.step_base)
        if not self._replica_done:  # (once done, the stages have pushed everything)
            # The gradient accrued since the stages' last push is not in the shards yet.
            steps -= (steps - self.start_steps) % self.n_push
        per_epoch = -(-len(self.rows) // self.batch_size)
        epoch, step = divmod(steps, per_epoch)
        # Every mini-batch of an epoch but the last is full.
        examples = epoch * len(self.rows) + step * self.batch_size
        self.ctx.tell(sender, DataPosition(self.replica, msg.tag, epoch, step, steps, examples))
        for stage in self.stages:  # behind the stages' pushes, to the shards
            self.ctx.tell(stage, CheckpointMark(msg.tag, sender))

    def _report(self) -> None:
        if self.window_steps:
            self.ctx.tell(
                self.master,
                Progress(
                    self.replica,
                    self.window_steps,
                    self.window_examples,
                    self.window_loss,
                    self.window_nonfinite,
                ),
            )
        self.window_steps = self.window_examples = self.window_nonfinite = 0
        self.window_loss = 0.0

    @receives(ActorRestarted)
    def on_actor_restarted(self, msg: ActorRestarted, sender: object) -> None:
        if msg.ref not in self.stages or self._replica_done:
            return
        if self._finishing:
            self.ctx.tell(msg.ref, Finish())  # it drains (nothing accrued) and reports done
        else:  # redo the steps the restart lost, in order (each counted once, when done)
            for step, forward in self._in_flight.items():
                if len(self.first) > 1:  # partitions tell the redo from the lost pass by it
                    forward = replace(forward, attempt=forward.attempt + 1)
                    self._in_flight[step] = forward
                    self.reports.pop(step, None)
                for ref in self.first:
                    self.ctx.tell(ref, forward)

    @receives(StageDone)
    def on_stage_done(self, msg: StageDone, sender: object) -> None:
        if self._replica_done or not self._finishing:
            return  # not finishing: a reply to this data shard's earlier life
        if msg.stage not in self.stage_buffers:
            self.crossed_bytes += msg.crossed_bytes
        self.stage_buffers[msg.stage] = msg.buffers
        if len(self.stage_buffers) == len(self.stages):
            self._replica_done = True
            # per stage (its first partition's: partitions hold no buffers)
            buffers = tuple(self.stage_buffers[s] for s in range(0, len(self.stages), self.parts))
            self._done_message = ReplicaDone(
                self.replica, self.steps, self.examples, buffers, self.crossed_bytes
            )
            self.ctx.tell(self.master, self._done_message)
