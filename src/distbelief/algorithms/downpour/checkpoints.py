"""The Downpour master's checkpoint coordination: when a checkpoint is due, the round that takes
one, and handing it to the checkpointer (``storage.checkpoint.Checkpointer``), which writes it.

A round (see ``messages.CheckpointRequest``): every data shard is asked for its replica's
position; each, before it answers, sends a mark through every stage of its replica behind that
stage's pushes, and every shard acknowledges each mark (``CheckpointMarked``). With every
position and every mark in, every push before those positions has been applied: then every
shard is asked for its state, and with every state in the lot goes to the checkpointer. Rounds
are told apart by their tag; one whose replies died with a restarted actor is started again
under a new tag (:meth:`CheckpointCoordinator.restart`).

After a stop signal (Ctrl-C, SIGTERM) the driver asks the master for one more round
(:class:`StopCheckpoint`, :func:`take_on_stop`): the runtimes deliver again while the driver
converses, so the round runs exactly as a periodic one, is written before the master answers
(:class:`StopCheckpointTaken`, with the parameters it holds: the model the driver keeps), and
no checkpoint is written after it, so it stays the newest.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import Deadlock, RunTimeout
from .messages import (
    CheckpointMarked,
    CheckpointRequest,
    DataPosition,
    ShardStateReply,
    TrainingDone,
)

log = logging.getLogger("distbelief")

Tell = Callable[[Any, Any], None]
"""How the owner sends a message to a ref (the master's ``ctx.tell``)."""


@dataclass(frozen=True, slots=True)
class StopCheckpoint:
    """Driver -> master, after a stop signal: take a checkpoint now (a round as the periodic
    ones), write it, answer :class:`StopCheckpointTaken`, and write none after it."""


@dataclass(frozen=True, slots=True)
class StopCheckpointTaken:
    """Master -> driver: the stop's checkpoint, written or not."""

    path: str | None
    """The ``ckpt-<update>`` directory written; None when nothing was (``why`` says why)."""
    steps: int
    """Steps over all replicas at the round's positions (what ``checkpoint_every`` counts)."""
    weights: torch.Tensor | None
    """The shards' parameters the round took (the checkpoint's, if written); None when
    checkpoints are off."""
    why: str = ""
    """Why nothing was written (empty when it was)."""


STOP_TIMEOUT_S = 300.0
"""Longest wait for the stop's checkpoint (a round takes milliseconds, its write seconds)."""


def take_on_stop(rt: Any, master: Any, timeout: float) -> StopCheckpointTaken | None:
    """Ask the master for the stop's checkpoint and wait for it (other messages to the
    driver, progress reports or a ``TrainingDone`` that was on its way, are dropped: the run
    is stopping). None, with a warning, if no answer comes within ``timeout`` s (at most
    ``STOP_TIMEOUT_S``) or the runtime finds it never will: the run still stops."""
    try:
        for reply in rt.converse(master, StopCheckpoint(), timeout=min(timeout, STOP_TIMEOUT_S)):
            if isinstance(reply, StopCheckpointTaken):
                return reply
    except (RunTimeout, Deadlock) as exc:
        log.warning("stopped without a last checkpoint: %s", exc)
        return None
    raise RuntimeError("the runtime stopped without a reply")  # pragma: no cover


class CheckpointCoordinator:
    """Owned by the master: takes a checkpoint every ``every`` steps (over all replicas, as the
    master counts them) and one at the end, through ``checkpointer`` (None: none are taken).
    ``marks`` is the number of ``CheckpointMarked`` a round waits for (one per replica, stage
    and shard segment); ``steps`` the steps done already (a resumed run's), from which the
    schedule counts on. It sends through ``tell``."""

    def __init__(
        self, tell: Tell, checkpointer: Any, every: int, marks: int, replicas: int, steps: int = 0
    ) -> None:
        self.tell = tell
        self.checkpointer = checkpointer
        self.every = every
        self.expected_marks = marks
        self.replicas = replicas
        self.next_due = steps + every
        self.resumed_steps = steps  # a stop round at these steps has nothing new to write
        self.tag = 0
        self.marks: dict[int, int] = {}  # tag -> marks received (until the shards are asked)
        self.positions: dict[int, dict[int, DataPosition]] = {}  # tag -> replica -> position
        self.states: dict[int, dict[int, Any]] = {}  # tag -> shard -> ShardState
        self.final_tag: int | None = None  # the end-of-run checkpoint's tag
        self.stop_tag: int | None = None  # the round asked for by a stop signal
        self.stop_to: Any = None  # whom to answer it (the driver)
        self.closed = False  # the stop's round is written: nothing is written after it
        self.data_shards: tuple = ()
        self.shards: tuple = ()

    @property
    def enabled(self) -> bool:
        """Whether checkpoints are taken at all (there is a checkpointer)."""
        return self.checkpointer is not None

    def connect(self, data_shards: tuple, shards: tuple) -> None:
        """The refs a round asks (``ConnectMaster``)."""
        self.data_shards, self.shards = data_shards, shards

    def note_progress(self, updates_applied: int) -> None:
        """Record the shards' updates applied so far beside the checkpoints (for
        ``checkpoint.updates_lost`` after a kill)."""
        if self.checkpointer is not None:
            self.checkpointer.note_progress(updates_applied)

    def on_steps(self, steps: int, running: bool) -> None:
        """The replicas have done ``steps`` in all: start a round if one is due. ``running``:
        the run is not at its end (there the final checkpoint comes instead)."""
        if self.every and steps >= self.next_due:
            while self.next_due <= steps:
                self.next_due += self.every
            # (one lost with a dead stage is dropped later; at the end the final one comes;
            # after a stop signal, the stop's round is the last)
            stopping = self.stop_tag is not None or self.closed
            if len(self.positions) < 2 and running and not stopping:
                self.start()

    def start(self) -> int:
        """Start a round: ask every data shard for its position (the shards are asked once
        every position and mark is in). Returns the round's tag."""
        self.tag += 1
        tag = self.tag
        self.positions[tag], self.states[tag], self.marks[tag] = {}, {}, 0
        for data_shard in self.data_shards:
            self.tell(data_shard, CheckpointRequest(tag))
        return tag

    def start_final(self) -> None:
        """Start the end-of-run round; :meth:`on_shard_state` says when it is written."""
        self.final_tag = self.start()

    def start_stop(self, reply_to: Any) -> None:
        """A stop signal: start the stop's round, answered to ``reply_to`` once written (at
        once, with nothing written, when checkpoints are off). Asked again: ignored."""
        if self.checkpointer is None:
            self.tell(reply_to, StopCheckpointTaken(None, 0, None, "checkpoints are off"))
            return
        if self.stop_tag is None and not self.closed:
            self.stop_to = reply_to
            self.stop_tag = self.start()

    def on_position(self, msg: DataPosition) -> None:
        """A data shard's position for a round."""
        if msg.tag in self.positions:
            self.positions[msg.tag][msg.replica] = msg
            self._ask_shards(msg.tag)

    def on_marked(self, msg: CheckpointMarked) -> None:
        """A shard has applied every push a stage sent before the round's mark."""
        if msg.tag in self.marks:
            self.marks[msg.tag] += 1
            self._ask_shards(msg.tag)

    def _ask_shards(self, tag: int) -> None:
        """Once every position and every mark is in, every push before those positions has
        been applied (see CheckpointRequest): now the shards' states are taken."""
        if len(self.positions[tag]) == self.replicas and self.marks[tag] == self.expected_marks:
            del self.marks[tag]
            for shard in self.shards:
                self.tell(shard, CheckpointRequest(tag))

    def on_shard_state(self, msg: ShardStateReply, diverged: bool) -> bool:
        """A shard's state for a round; with every shard's in, the round goes to the
        checkpointer, unless the run ``diverged`` (the last good checkpoint stays) and this is
        not the final round. Returns True when the final round has been written."""
        got = self.states.get(msg.tag)
        if got is None:
            return False  # a superseded checkpoint's (dropped below)
        got[msg.shard] = msg.state
        if len(got) < len(self.shards):
            return False
        positions = self.positions.pop(msg.tag)
        del self.states[msg.tag]
        keep = (self.final_tag, self.stop_tag)
        for older in [t for t in self.positions if t < msg.tag and t not in keep]:
            # superseded (its marks lost with a stage that died): forget it
            del self.positions[older], self.states[older]
            self.marks.pop(older, None)
        final = msg.tag == self.final_tag
        shards = [got[k] for k in range(len(self.shards))]
        update = sum(int(s.counters["updates_applied"]) for s in shards)
        where = {
            r: {"epoch": p.epoch, "step": p.step, "steps": p.steps, "examples": p.examples}
            for r, p in sorted(positions.items())
        }
        if msg.tag == self.stop_tag:
            self._write_stop(update, shards, where, diverged)
            return False
        if self.closed:
            return final  # the stop's checkpoint stays the newest: the master just finishes
        if diverged and not final:
            return False  # never replace the last good checkpoint with a diverged state
        # The final one is written before the driver hears the run is done; the others in
        # the background while training goes on.
        self.checkpointer.submit(update, shards, where, wait=final)
        return final

    def _write_stop(
        self, update: int, shards: list[Any], where: dict[int, dict[str, int]], diverged: bool
    ) -> None:
        """Write the stop's round (unless the run diverged, or no step was pushed since the
        run started: nothing new) before answering, and close: no round is written after."""
        self.closed, self.stop_tag = True, None
        steps = sum(p["steps"] for p in where.values())
        weights = torch.cat([s.weights for s in shards])
        path, why = None, ""
        if diverged:
            why = "the run diverged: the last good checkpoint stays"
        elif steps <= self.resumed_steps:
            why = "no step was pushed since the run started"
        else:
            self.checkpointer.submit(update, shards, where, wait=True)
            written = self.checkpointer.written_at(update)
            path = str(written) if written is not None else None
            why = "" if written is not None else "not written (see the warning)"
        self.tell(self.stop_to, StopCheckpointTaken(path, steps, weights, why))

    def restart(self, shard: int | None = None) -> None:
        """An actor was restarted. A round still waiting for marks (or positions) may wait
        forever: the dead actor's are lost. So may one waiting for the state of ``shard``, the
        dead shard. Start it again under a new tag, whose replies cannot be mistaken for the
        old ones."""
        for tag in list(self.positions):
            lost_state = shard is not None and shard not in self.states.get(tag, {})
            if tag in self.marks or lost_state:
                self.marks.pop(tag, None)
                del self.positions[tag], self.states[tag]
                again = self.start()
                if tag == self.final_tag:
                    self.final_tag = again
                if tag == self.stop_tag:
                    self.stop_tag = again

    def finish(self, done: TrainingDone) -> TrainingDone:
        """The run's report, with the checkpointer's counts once its writes are over."""
        if self.checkpointer is None:
            return done
        self.checkpointer.join()
        return dataclasses.replace(done, checkpoints=self.checkpointer.stats)
