"""Sandblaster's coordinator: runs L-BFGS over the shards and hands portions to the replicas."""

from __future__ import annotations

import pickle
import time

from ...results import ProgressReport
from ...runtime.base import Actor, ActorRestarted, receives
from ..messages import Begin
from .lbfgs import REDUCE, Outcome, Settings, StepEnd, lbfgs
from .messages import (
    Assign,
    ConnectSandblaster,
    CoordinatorState,
    Evaluate,
    Flush,
    PortionDone,
    Reduce,
    Reduced,
    SandblasterDone,
    StopAtStepEnd,
    StoppedAtStepEnd,
    VectorOps,
    VectorResults,
    VectorsRequest,
    Verdict,
)
from .portions import PortionBook


def message_bytes(message: object) -> int:
    """Size of a message as pickled: what ``coordinator_bytes`` adds up."""
    return len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


class Coordinator(Actor):
    """Drives :func:`~.lbfgs.lbfgs` one request at a time and never holds a
    parameter-sized vector: a vector program goes to every shard and the partial reductions
    that come back are combined here, on scalars; a function evaluation is cut into portions
    handed to free replicas (:class:`~.portions.PortionBook`), whose loss sums come
    back here and whose gradient sums go to the shards, which ``Reduce`` them into ``"gw"``.

    Steppable: every decision is one message handler, and the state is plain attributes
    (``request``, ``book``, ``evaluation``, counters).
    """

    def __init__(
        self,
        settings: Settings,
        replicas: int,
        portions: int,
        batch_examples: int,
        backup: bool = True,
        duplicate_all: bool = False,
        replica_names: tuple[str, ...] = (),
        count_bytes: bool = True,
        checkpoint_every: int = 0,
        checkpoints: bool = False,
        resume: dict | None = None,
    ) -> None:
        self.settings = settings
        self.replicas = replicas
        self.portion_count = portions
        self.batch_examples = batch_examples
        self.backup = backup
        self.duplicate_all = duplicate_all
        self.replica_names = replica_names
        self.count_bytes = count_bytes
        self.shards: tuple = ()
        self.replica_refs: tuple = ()
        self.driver = None
        # Checkpoints: at the end of every ``checkpoint_every``-th step and of the last one,
        # the state goes to the driver and each shard sends it its vectors (see on_begin).
        self.checkpoint_every = checkpoint_every
        self.checkpoints = checkpoints
        self.stop_to = None  # the driver, once a stop signal asked to stop at a step's end
        self.stepped = False  # a step of this run has ended
        self.algo = lbfgs(settings, resume)
        self.request: VectorOps | Evaluate | StepEnd | None = None
        self.tag = 0
        self.partials: dict[int, tuple[float, ...]] = {}
        self.evaluation = 0
        self.batch = 0
        self.round = 0
        self.book: PortionBook | None = None
        self.losses: dict[int, float] = {}  # portion -> loss sum of its counted result
        self.reduced: set[int] = set()
        self.reducing = False
        self.generation = [0] * replicas
        self.assigned = [0] * replicas  # portions ever assigned, per replica (Assign.step)
        self.idle: set[int] = set()
        self.portions_done = [0] * replicas
        self.portions_computed = [0] * replicas
        self.backup_portions = 0
        self.backup_wins = 0
        self.duplicates_dropped = 0
        self.partition_bytes = 0  # within the replicas' stages, every portion computed
        self.reassigned = 0
        self.restarts = 0
        self.examples = 0
        self.bytes = 0
        self.messages = 0
        self.t0 = 0.0
        self.outcome: Outcome | None = None

    # -------------------------------------------------------------- traffic accounting

    def _tell(self, ref: object, message: object) -> None:
        if self.count_bytes:
            self.bytes += message_bytes(message)
        self.messages += 1
        self.ctx.tell(ref, message)

    def _got(self, message: object, wiring: bool = False) -> None:
        # The wiring (and a restart notice) holds refs, which pickle as whatever the runtime
        # makes them: counted as a message, not in bytes.
        if self.count_bytes and not wiring:
            self.bytes += message_bytes(message)
        self.messages += 1

    # -------------------------------------------------------------- driving L-BFGS

    @receives(ConnectSandblaster)
    def on_connect(self, msg: ConnectSandblaster, sender: object) -> None:
        self._got(msg, wiring=True)
        self.shards, self.replica_refs = msg.shards, msg.replicas

    @receives(Begin)
    def on_begin(self, msg: Begin, sender: object) -> None:
        self._got(msg)
        self.driver = sender
        self.t0 = time.perf_counter()
        self._advance(None)

    def _advance(self, reply: object) -> None:
        """Send the algorithm the answer to its last request and carry out its next one."""
        try:
            self.request = self.algo.send(reply)
        except StopIteration as stop:
            self.request = None
            self.outcome = stop.value
            self._finish()
            return
        if isinstance(self.request, StepEnd):
            wall = time.perf_counter() - self.t0
            report = ProgressReport(self.request.step, self.settings.steps, self.request.loss, wall)
            self._tell(self.driver, report)
            self.stepped = True
            if self.stop_to is not None:
                self._stop_at(self.request)
                return
            self._checkpoint(self.request)
            self._advance(None)
        elif isinstance(self.request, VectorOps):
            self.tag += 1
            self.partials = {}
            program = VectorOps(self.request.ops, self.tag)
            for shard in self.shards:
                self._tell(shard, program)
        else:
            self._start_evaluation(self.request.batch)

    def _checkpoint(self, end: StepEnd, force: bool = False) -> bool:
        """A checkpoint of this step, if one is due (or ``force``): the state to the driver,
        and a request to every shard, ahead of any further program, to send the driver its
        vectors. Returns whether one is taken."""
        state = end.state
        if not self.checkpoints or state is None:
            return False
        due = self.checkpoint_every and end.step % self.checkpoint_every == 0
        if not (due or state["stop"] or force):  # the last step's is always taken
            return False
        self._tell(self.driver, CoordinatorState(end.step, state))
        for shard in self.shards:  # it holds a ref: a message, not counted in bytes
            self.messages += 1
            self.ctx.tell(shard, VectorsRequest(end.step, self.driver))
        return True

    @receives(StopAtStepEnd)
    def on_stop_at_step_end(self, msg: StopAtStepEnd, sender: object) -> None:
        # (the run is stopping: the traffic stats are not reported, so not counted)
        if self.request is None or not self.stepped or not self.checkpoints:
            self.ctx.tell(sender, StoppedAtStepEnd(None))  # nothing new, or nothing under way
            return
        self.stop_to = sender  # the step under way ends, then _stop_at

    def _stop_at(self, end: StepEnd) -> None:
        """A stop signal asked to stop at this step's end: its checkpoint, then nothing more
        (the shards' vectors stay those of this step)."""
        taken = self._checkpoint(end, force=True)
        self.request = None
        self.ctx.tell(self.stop_to, StoppedAtStepEnd(end.step if taken else None))

    @receives(VectorResults)
    def on_vector_results(self, msg: VectorResults, sender: object) -> None:
        self._got(msg)
        if msg.tag != self.tag:
            return
        self.partials[msg.shard] = msg.values
        if len(self.partials) < len(self.shards):
            return
        kinds = [op.kind for op in self.request.ops if op.kind in REDUCE]
        parts = list(self.partials.values())
        values = [REDUCE[k]([p[i] for p in parts]) for i, k in enumerate(kinds)]
        self._advance(values)

    # -------------------------------------------------------------- one function evaluation

    def _start_evaluation(self, batch: int) -> None:
        self.evaluation += 1
        self.batch = batch
        self.round = 0
        self.reducing = False
        self.losses = {}
        self.book = PortionBook(self.portion_count, self.replicas, self.backup, self.duplicate_all)
        self.idle = set(range(self.replicas))
        self._assign_idle()

    def _assign_idle(self) -> None:
        for r in sorted(self.idle):
            self._assign(r)

    def _assign(self, replica: int) -> None:
        if replica in self.book.busy:
            # Still computing a portion of this evaluation (its late result of an earlier one
            # came in): a second assignment would replace the first, whose result would then
            # never reach the shards, and the Reduce would wait for it forever.
            return
        got = self.book.next_for(replica)
        if got is None:
            self.idle.add(replica)
            return
        self.idle.discard(replica)
        portion, is_backup = got
        if is_backup:
            self.backup_portions += 1
        step = self.assigned[replica]
        self.assigned[replica] += 1
        assign = Assign(self.evaluation, self.batch, portion, self.generation[replica], step)
        self._tell(self.replica_refs[replica], assign)

    @receives(PortionDone)
    def on_portion_done(self, msg: PortionDone, sender: object) -> None:
        self._got(msg)
        r = msg.replica
        if msg.generation != self.generation[r]:
            self.duplicates_dropped += 1  # from an incarnation that died: nothing of it counts
            return
        self.portions_computed[r] += 1
        self.partition_bytes += msg.crossed_bytes
        current = self.book is not None and msg.evaluation == self.evaluation
        accepted = current and self.book.complete(r, msg.portion)
        self._tell(sender, Verdict(msg.evaluation, msg.portion, accepted))
        if accepted:
            self.losses[msg.portion] = msg.loss_sum
            self.portions_done[r] += 1
        else:
            self.duplicates_dropped += 1
        if self.request is not None and isinstance(self.request, Evaluate) and not self.reducing:
            self._assign(r)
            if self.book.done:
                self._reduce()
        else:
            self.idle.add(r)

    def _reduce(self) -> None:
        """Every portion is counted: have the replicas push what they accrued and the shards
        sum exactly the accepted portions into ``"gw"``."""
        self.reducing = True
        self.round += 1
        self.reduced = set()
        for ref in self.replica_refs:
            self._tell(ref, Flush(self.evaluation))
        expected = tuple(
            (r, self.generation[r], self.book.counted_by(r))
            for r in range(self.replicas)
            if self.book.counted_by(r)
        )
        message = Reduce(self.evaluation, self.round, expected, self.batch_examples)
        for shard in self.shards:
            self._tell(shard, message)

    @receives(Reduced)
    def on_reduced(self, msg: Reduced, sender: object) -> None:
        self._got(msg)
        if (msg.evaluation, msg.round) != (self.evaluation, self.round) or not self.reducing:
            return
        self.reduced.add(msg.shard)
        if len(self.reduced) < len(self.shards):
            return
        self.reducing = False
        self.examples += self.batch_examples
        loss = sum(self.losses[p] for p in sorted(self.losses)) / self.batch_examples
        self.backup_wins += self.book.backup_wins
        self.book = None
        self._advance(loss)

    @receives(ActorRestarted)
    def on_actor_restarted(self, msg: ActorRestarted, sender: object) -> None:
        """A replica died and was restarted: nothing it computed in this evaluation counts
        any more; its portions go to others (and to it, once free)."""
        self._got(msg, wiring=True)  # it holds a ref: a message, not counted in bytes
        if msg.name not in self.replica_names:
            return
        r = self.replica_names.index(msg.name)
        self.restarts += 1
        self.generation[r] += 1
        if self.book is None:
            return
        self.portions_done[r] -= self.book.counted_by(r)
        for p in self.book.lost(r):
            self.losses.pop(p, None)
            self.reassigned += 1
        self.reducing = False  # an earlier Reduce waits for sums that will not all come
        self.idle.add(r)
        self._assign_idle()
        if self.book.done:
            self._reduce()

    # -------------------------------------------------------------- the end

    def _finish(self) -> None:
        out = self.outcome
        done = SandblasterDone(
            loss=out.loss,
            steps=out.steps,
            function_evals=out.function_evals,
            stop=out.stop,
            losses=tuple(out.losses),
            portions_done=tuple(self.portions_done),
            portions_computed=tuple(self.portions_computed),
            backup_portions=self.backup_portions,
            backup_wins=self.backup_wins,
            duplicates_dropped=self.duplicates_dropped,
            reassigned=self.reassigned,
            coordinator_bytes=0,
            coordinator_messages=0,
            train_s=time.perf_counter() - self.t0,
            examples=self.examples,
            restarts=self.restarts,
            diverged=out.diverged,
            partition_bytes=self.partition_bytes,
        )
        size = message_bytes(done) if self.count_bytes else 0
        self.ctx.tell(
            self.driver,
            _with_traffic(done, self.bytes + size, self.messages + 1),
        )


def _with_traffic(done: SandblasterDone, nbytes: int, messages: int) -> SandblasterDone:
    from dataclasses import replace

    return replace(done, coordinator_bytes=nbytes, coordinator_messages=messages)
