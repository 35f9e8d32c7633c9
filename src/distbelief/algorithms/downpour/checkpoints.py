"""The Downpour master's checkpoint coordination: when a checkpoint is due, the round that takes
one, and handing it to the checkpointer (``storage.checkpoint.Checkpointer``), which writes it.

A round (see ``messages.CheckpointRequest``): every data shard is asked for its replica's
position; each, before it answers, sends a mark through every stage of its replica behind that
stage's pushes, and every shard acknowledges each mark (``CheckpointMarked``). With every
position and every mark in, every push before those positions has been applied: then every
shard is asked for its state, and with every state in the lot goes to the checkpointer. Rounds
are told apart by their tag; one whose replies died with a restarted actor is started again
under a new tag (:meth:`CheckpointCoordinator.restart`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .messages import (
    CheckpointMarked,
    CheckpointRequest,
    DataPosition,
    ShardStateReply,
    TrainingDone,
)

Tell = Callable[[Any, Any], None]
"""How the owner sends a message to a ref (the master's ``ctx.tell``)."""


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
        self.tag = 0
        self.marks: dict[int, int] = {}  # tag -> marks received (until the shards are asked)
        self.positions: dict[int, dict[int, DataPosition]] = {}  # tag -> replica -> position
        self.states: dict[int, dict[int, Any]] = {}  # tag -> shard -> ShardState
        self.final_tag: int | None = None  # the end-of-run checkpoint's tag
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
            # (one lost with a dead stage is dropped later; at the end the final one comes)
            if len(self.positions) < 2 and running:
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
        for older in [t for t in self.positions if t < msg.tag and t != self.final_tag]:
            # superseded (its marks lost with a stage that died): forget it
            del self.positions[older], self.states[older]
            self.marks.pop(older, None)
        final = msg.tag == self.final_tag
        if diverged and not final:
            return False  # never replace the last good checkpoint with a diverged state
        shards = [got[k] for k in range(len(self.shards))]
        update = sum(int(s.counters["updates_applied"]) for s in shards)
        where = {
            r: {"epoch": p.epoch, "step": p.step, "steps": p.steps, "examples": p.examples}
            for r, p in sorted(positions.items())
        }
        # The final one is written before the driver hears the run is done; the others in
        # the background while training goes on.
        self.checkpointer.submit(update, shards, where, wait=final)
        return final

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

    def finish(self, done: TrainingDone) -> TrainingDone:
        """The run's report, with the checkpointer's counts once its writes are over."""
        if self.checkpointer is None:
            return done
        self.checkpointer.join()
        return dataclasses.replace(done, checkpoints=self.checkpointer.stats)
