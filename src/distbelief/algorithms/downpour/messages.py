"""Downpour SGD's messages: between its actors, and between the driver and the master.

Messages are frozen, slotted dataclasses. The envelope (who sent it) is the runtime's business,
not the message's. **A tensor in a message is never mutated after it is sent**, by its sender
or its receiver (receivers treat message tensors as read-only). The in-process runtime shares
memory and Ray serializes, so this contract is what makes the two runtimes agree.

- Activations, input gradients and pushed gradients are fresh tensors: they travel as they are.
- A shard *lends* a segment's values in a ``FetchReply`` instead of copying them: until the
  stage's ``Push`` says ``done_reading`` (or the stage fetches again), the shard applies
  updates to a copy of the segment (copy on write) and leaves the lent tensor alone. With one
  replica and ``n_fetch = 1`` a step therefore copies no parameters at all.
- Snapshots are copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# ---------------------------------------------------------------- wiring (driver -> actors)


@dataclass(frozen=True, slots=True)
class ConnectStage:
    """Tells a stage who its neighbours are."""

    previous: Any
    """Ref of the stage before this one, or None for the first stage."""
    next: Any
    """Ref of the stage after this one, or None for the last stage."""
    shards: tuple[Any, ...]
    """Refs of all PS shards, indexed by shard number."""
    data_shard: Any
    """Ref of the replica's data shard (told when a step or the replica finishes)."""


@dataclass(frozen=True, slots=True)
class ConnectDataShard:
    """Tells a data shard which stages make up its replica and who the master is."""

    stages: tuple[Any, ...]
    """Refs of the replica's stages, first to last."""
    master: Any
    """Ref of the Downpour master."""
    first: tuple[Any, ...] = ()
    """Refs the mini-batches go to: the first stage's partitions (each gets all of the
    input; each reports its backward pass done); empty: ``stages[0]``."""
    parts: int = 1
    """Partitions per stage: ``stages`` holds each stage's partitions in turn."""


@dataclass(frozen=True, slots=True)
class ConnectMaster:
    """Tells the master the data shards (one per replica) and the PS shards."""

    data_shards: tuple[Any, ...]
    """Refs of the replicas' data shards, indexed by replica."""
    shards: tuple[Any, ...]
    """Refs of the PS shards, indexed by shard."""
    buffer_stages: tuple[Any, ...] = ()
    """Refs of replica 0's stages whose layers hold buffers (e.g. BatchNorm statistics, which
    the PS does not hold): an evaluation during training asks them for their buffers."""
    stages: tuple[tuple[Any, ...], ...] = ()
    """Refs of every replica's stages (``stages[replica][stage]``): when a shard is restarted
    the master asks them for their copies of its segments (``CopyRequest``)."""


@dataclass(frozen=True, slots=True)
class TrainingDone:
    """Master -> driver: the run finished; everything needed to build the result."""

    weights: torch.Tensor
    """Final flat parameter vector assembled from all shards."""
    shard_stats: tuple[dict[str, Any], ...]
    """Per-shard counters: updates applied, staleness sum, max and histogram, rejected pushes."""
    buffers: tuple[dict[str, torch.Tensor], ...]
    """Replica 0's module buffers per stage (e.g. BatchNorm statistics; not on the PS)."""
    history: dict[str, list]
    """Training loss curve and evaluation points."""
    train_s: float
    """Seconds from the first mini-batch to the last push applied, evaluation excluded."""
    eval_s: float
    """Seconds spent evaluating during training."""
    examples: int
    """Training examples processed over all replicas."""
    steps: int
    """Mini-batch steps over all replicas."""
    restarts: int = 0
    """Actors that died and were restarted during the run (ActorRestarted notices)."""
    nonfinite_steps: int = 0
    """Steps whose loss was NaN or Inf (a few are tolerated; their pushes were rejected)."""
    recoveries: tuple[dict[str, Any], ...] = ()
    """One record per restarted shard, data shard or master: what it was restored from and,
    for a shard, the updates lost (see ``recovery.choose``)."""
    checkpoints: dict[str, Any] = field(default_factory=dict)
    """What checkpointing did (``checkpoint.Checkpointer.stats``); empty without it."""
    crossed_bytes: int = 0
    """Bytes the partitions of every replica's stages sent each other (see ``StageDone``)."""


@dataclass(frozen=True, slots=True)
class DataUnreadable:
    """Data shard -> master -> driver: the replica's data file changed or shrank after it was
    checked; stop the run and keep what was trained (see ``DataChanged``)."""

    replica: int
    """The replica whose data shard found it."""
    reason: str
    """The file and what changed (``DataFileChanged``'s message)."""


@dataclass(frozen=True, slots=True)
class Diverged:
    """Master -> driver: training diverged; stop the run (see ``TrainingDiverged``)."""

    reason: str
    """What went wrong, and when (in examples)."""


# ---------------------------------------------------------------- recovery (see recovery.py)


@dataclass(frozen=True, slots=True)
class CopyRequest:
    """Master -> stage: a shard was restarted; send your copy of its segments."""

    shard: int
    """Index of the restarted shard."""


@dataclass(frozen=True, slots=True)
class SegmentCopy:
    """Stage -> master: the stage's copy of its segment on a shard (the values it fetched
    last, as it reads them now), or only its length when it has none."""

    shard: int
    """Index of the shard asked about."""
    replica: int
    """Replica of the replying stage."""
    stage: int
    """Index of the replying stage (which segment of the shard it is)."""
    length: int
    """Elements of the segment (0: the stage has none on this shard)."""
    values: torch.Tensor | None
    """A copy of the values, or None when the stage has not fetched them (yet)."""
    version: int
    """The segment's version when the stage fetched it (-1 with no values)."""


@dataclass(frozen=True, slots=True)
class RestoreShard:
    """Master -> restarted shard: carry on from these segments; until it arrives the shard
    holds back every message (fetches are answered, pushes applied, after it)."""

    values: dict[int, torch.Tensor]
    """New values per segment (by stage); a segment left out keeps its initial values at
    version 0 (no copy of it existed anywhere)."""
    versions: dict[int, int]
    """Version per segment restored (by stage)."""
    optimizer: dict[int, Any]
    """Update-rule state per segment (by stage); a segment left out starts it afresh."""
    counters: dict[str, int]
    """``rejected_pushes``, ``staleness_sum``, ``staleness_max`` as last known (the shard sets
    ``updates_applied`` to the sum of the restored versions)."""


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Restarted master -> data shard: where is your replica? (reply ``ReplicaStatus``)."""


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """Data shard -> master: its replica's position, as a restarted master rebuilds from."""

    replica: int
    """Replica index."""
    started: bool
    """Whether the replica was started (``StartReplica`` or ``ResumeReplica``)."""
    steps: int
    """Steps of this run (not of a run it resumed) reported to the master so far, in
    ``Progress`` (later ones come in Progress)."""
    examples: int
    """Examples in those steps."""
    step_base: int
    """The data shard's step numbering base (bumped by each of its restarts)."""
    done: ReplicaDone | None
    """The replica's ``ReplicaDone`` when it is finished, else None."""
    steps_done: int = 0
    """Steps done, reported or not yet (whether a warmstart is over)."""


@dataclass(frozen=True, slots=True)
class ResumeReplica:
    """Master -> restarted data shard: carry on from ``steps`` steps (its epoch order is a
    function of the seed and the epoch, so the position is the step count)."""

    steps: int
    """Steps of this run done, as reported to the master (a resumed run's data shard adds
    the steps of its checkpoint position)."""
    examples: int
    """Examples in those steps."""
    step_base: int
    """Number steps from here on from this base, above every step of the data shard's
    earlier life still on its way through the stages (whose replies it then ignores)."""
    warmstart_steps: int = 0
    """As in ``StartReplica``: report ``WarmstartDone`` at this step (0: not any more)."""


# ---------------------------------------------------------------- master <-> data shards


@dataclass(frozen=True, slots=True)
class StartReplica:
    """Master -> data shard: start feeding mini-batches."""

    warmstart_steps: int = 0
    """If > 0, report WarmstartDone after this many steps (replica 0 only)."""


@dataclass(frozen=True, slots=True)
class WarmstartDone:
    """Data shard -> master: the warmstart replica finished its solo steps."""

    replica: int
    """Replica index."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Data shard -> master: steps completed since the last report."""

    replica: int
    """Replica index."""
    steps: int
    """Steps completed since the previous report."""
    examples: int
    """Examples in those steps."""
    loss_sum: float
    """Sum of the mini-batch losses of those steps whose loss was finite."""
    nonfinite_steps: int = 0
    """Steps among those whose loss was NaN or Inf (the shards reject their pushes)."""


@dataclass(frozen=True, slots=True)
class ReplicaDone:
    """Data shard -> master: all epochs done and every push of the replica applied."""

    replica: int
    """Replica index."""
    steps: int
    """Steps the replica completed."""
    examples: int
    """Examples the replica processed."""
    buffers: tuple[dict[str, torch.Tensor], ...]
    """Module buffers of each stage of the replica."""
    crossed_bytes: int = 0
    """Bytes its stages' partitions sent each other (see ``StageDone``)."""


# ---------------------------------------------------------------- data shard <-> stages


@dataclass(frozen=True, slots=True)
class Forward:
    """Activations flowing forward: mini-batch into stage 0, or a stage's output to the next."""

    step: int
    """Replica-local step number."""
    activations: torch.Tensor
    """Input of the receiving stage (never mutated after sending)."""
    targets: torch.Tensor
    """Targets of the mini-batch, for the last stage's loss."""
    attempt: int = 0
    """How many times the data shard sent this step before (partitions: a redo after a
    restart is told apart from what is left of the lost pass)."""


@dataclass(frozen=True, slots=True)
class Backward:
    """Gradient w.r.t. a stage's output flowing backward to it."""

    step: int
    """Replica-local step number."""
    grad: torch.Tensor
    """Gradient of the loss w.r.t. the receiving stage's output."""
    loss: float
    """Mini-batch loss, carried back so the data shard can record it."""


@dataclass(frozen=True, slots=True)
class StepDone:
    """First stage -> data shard: the step's backward pass reached the input."""

    step: int
    """Replica-local step number."""
    loss: float
    """Mini-batch loss."""
    block: int = 0
    """The reporting partition of the first stage (each reports; a stage: 0)."""
    attempt: int = 0
    """The attempt (``Forward.attempt``) whose backward pass is done."""


@dataclass(frozen=True, slots=True)
class Finish:
    """Data shard -> stage: no more mini-batches; push what is accrued and drain."""


@dataclass(frozen=True, slots=True)
class StageDone:
    """Stage -> data shard: all of the stage's pushes are applied at the shards."""

    stage: int
    """Stage index."""
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    """The stage's module buffers (copies)."""
    crossed_bytes: int = 0
    """A partition: bytes it sent the other partitions of its stage (the parts of its
    pieces their strips read, and the gradients of theirs it read), in this life."""


# ---------------------------------------------------------------- partitions (see partition.py)


@dataclass(frozen=True, slots=True)
class ConnectPartition:
    """Tells a partition (a block of a stage) who its neighbours are."""

    previous: tuple[Any, ...] | None
    """Refs of the previous stage's partitions (None for the first stage)."""
    peers: tuple[Any, ...]
    """Refs of its own stage's partitions, by block (itself included)."""
    next: tuple[Any, ...] | None
    """Refs of the next stage's partitions (None for the last stage)."""
    shards: tuple[Any, ...]
    """Refs of all PS shards, indexed by shard number."""
    data_shard: Any
    """Ref of the replica's data shard."""


@dataclass(frozen=True, slots=True)
class BlockInput:
    """A partition of stage s -> every partition of stage s + 1: its piece of the stage's
    output (the next stage's input, which each assembles from all the pieces)."""

    step: int
    """Replica-local step number."""
    attempt: int
    """The step's attempt (``Forward.attempt``)."""
    src: int
    """The sending block."""
    activations: torch.Tensor
    """Its piece of the output."""
    targets: torch.Tensor
    """Targets of the mini-batch, for the last stage's loss."""


@dataclass(frozen=True, slots=True)
class Exchange:
    """Partition -> partition of the same stage: the part of its piece of a layer's input
    that the receiver's strip reads (a ``core.blocks.Transfer``), before that layer."""

    step: int
    """Replica-local step number."""
    attempt: int
    """The step's attempt."""
    layer: int
    """The layer (index within the stage) whose input it is."""
    src: int
    """The sending block."""
    values: torch.Tensor
    """The part of its piece."""


@dataclass(frozen=True, slots=True)
class ExchangeGrad:
    """Partition -> partition of the same stage: the gradient of the part of the receiver's
    piece that the sender read for ``layer`` (``Exchange`` back); the receiver sums them."""

    step: int
    """Replica-local step number."""
    attempt: int
    """The step's attempt."""
    layer: int
    """The layer whose input it is the gradient of."""
    src: int
    """The sending block (the transfer's destination)."""
    grad: torch.Tensor
    """The gradient of those positions."""


@dataclass(frozen=True, slots=True)
class BlockOutput:
    """A partition of the last stage -> its block 0: its piece of the replica's output, for
    the loss (block 0 assembles the output, takes the loss and its gradient)."""

    step: int
    """Replica-local step number."""
    attempt: int
    """The step's attempt."""
    src: int
    """The sending block."""
    piece: torch.Tensor
    """Its piece of the output."""


@dataclass(frozen=True, slots=True)
class BlockGrad:
    """The gradient of the receiving partition's output piece: all of it from block 0 of the
    last stage (the loss's), or a partial from each partition of the next stage (summed)."""

    step: int
    """Replica-local step number."""
    attempt: int
    """The step's attempt."""
    src: int
    """The sending block."""
    grad: torch.Tensor
    """The gradient (or a partial of it)."""
    loss: float
    """Mini-batch loss, carried back to the data shard."""


# ---------------------------------------------------------------- stages <-> PS shards


@dataclass(frozen=True, slots=True)
class Fetch:
    """Stage -> shard: send me the current values of my segment.

    Also says the stage has stopped reading the values it fetched before, if any."""

    replica: int
    """Replica of the requesting stage (the shard tracks who reads lent values)."""
    stage: int
    """Index of the requesting stage (selects the segment)."""
    keep: bool = False
    """The stage keeps the reply's values as they are, as its own version of them (a
    partition that fetches all of its parameters from one shard): the shard sends a copy of
    its own, neither lent nor a buffer its next fetch reuses, so that it is not copied
    again on arrival."""


@dataclass(frozen=True, slots=True)
class FetchReply:
    """Shard -> stage: the segment's current values."""

    shard: int
    """Index of the replying shard."""
    weights: torch.Tensor
    """The segment's values, lent: read-only to the stage, and never changed by the shard
    (it updates a copy while any stage still reads them); the stage's own copy if its fetch
    asked to ``keep`` them."""
    version: int
    """Updates applied to the segment so far; pushes quote it back to measure staleness."""


@dataclass(frozen=True, slots=True)
class Push:
    """Stage -> shard: gradient accrued since the previous push, for one segment."""

    replica: int
    """Replica of the pushing stage."""
    stage: int
    """Index of the pushing stage (selects the segment)."""
    grads: tuple[torch.Tensor, ...]
    """Accrued gradient of the segment in pieces: one 1-D tensor per model tensor overlapping
    the segment, in position order (``Segment.pieces``); their concatenation is the
    segment's gradient. Each is the tensor autograd produced, or a slice of it: no copy."""
    fetched_version: int
    """Version of the segment when the stage last fetched it."""
    done_reading: bool = True
    """The stage will not read the values it fetched again (it fetches before its next
    forward), so the shard may update them in place."""


@dataclass(frozen=True, slots=True)
class Drain:
    """Stage -> shard: reply once every earlier push of mine is applied."""

    stage: int
    """Index of the stage asking."""


@dataclass(frozen=True, slots=True)
class Drained:
    """Shard -> stage: every push the stage sent before Drain is applied."""

    shard: int
    """Index of the replying shard."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Master -> shard: send a copy of your whole slice and your counters."""

    tag: int
    """Matches the replies to the request (evaluation number, or -1 for the final one)."""


@dataclass(frozen=True, slots=True)
class BufferSnapshot:
    """Master -> stage: send a copy of your module buffers (for an evaluation)."""

    tag: int
    """Matches the reply to the request (the evaluation number)."""


@dataclass(frozen=True, slots=True)
class StageBuffers:
    """Stage -> master: the stage's module buffers."""

    tag: int
    """The request's tag."""
    stage: int
    """Index of the replying stage."""
    buffers: dict[str, torch.Tensor]
    """Copies of the stage's module buffers, by name within the stage."""


@dataclass(frozen=True, slots=True)
class ShardSnapshot:
    """Shard -> master: the slice's current values and the shard's counters."""

    shard: int
    """Index of the replying shard."""
    tag: int
    """The request's tag."""
    weights: torch.Tensor
    """A copy of the shard's slice."""
    stats: dict[str, Any]
    """The shard's counters, as in ``ShardStats``."""


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Master -> shard: send your counters (asked at every progress report; cheap)."""


@dataclass(frozen=True, slots=True)
class ShardStats:
    """Shard -> master: a shard's counters, for the driver's live view and run log."""

    shard: int
    """Shard index."""
    stats: dict[str, Any]
    """``updates_applied``, ``rejected_pushes``, ``staleness_sum``, ``staleness_max`` and
    ``staleness_histogram`` (a list: entry i counts the updates applied with staleness i)."""


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    """Master -> data shard, then master -> shard: your part of checkpoint ``tag``.

    A data shard replies with its replica's position (``DataPosition``) and sends a
    ``CheckpointMark`` through each of its stages to their shards. The master asks the shards
    for their state only once every position and every mark is in: each mark travelled after
    its stage's pushes on the same ordered channel, so those pushes were applied before the
    shard answered it, and resuming from the positions never skips a mini-batch."""

    tag: int
    """Matches the replies to the request (checkpoints are numbered from 1)."""


@dataclass(frozen=True, slots=True)
class CheckpointMark:
    """Data shard -> its stages -> their shards: every push the stage sent before this one
    is applied once the shard has handled it (per-sender FIFO)."""

    tag: int
    """The checkpoint's tag."""
    reply_to: Any
    """The master, whom the shard tells ``CheckpointMarked``."""


@dataclass(frozen=True, slots=True)
class CheckpointMarked:
    """Shard -> master: a stage's ``CheckpointMark`` reached this shard."""

    tag: int
    """The checkpoint's tag."""
    shard: int
    """Index of the replying shard."""


@dataclass(frozen=True, slots=True)
class ShardStateReply:
    """Shard -> master: everything the shard needs to carry on (``ParameterShard.export_state``)."""

    shard: int
    """Index of the replying shard."""
    tag: int
    """The request's tag."""
    state: Any
    """A ``checkpoint.ShardState``: copies of the slice and the update rules' state, the
    segments' versions and the counters."""


@dataclass(frozen=True, slots=True)
class DataPosition:
    """Data shard -> master: where its replica may resume without skipping data.

    At or before the last step whose gradient its stages have pushed: the step count is
    rounded down to a multiple of ``n_push`` (counted from where this run started), since
    the gradient accrued since the last push is not in the shards."""

    replica: int
    """The replica."""
    tag: int
    """The request's tag."""
    epoch: int
    """Epoch to resume in."""
    step: int
    """Index of the mini-batch to resume at within that epoch."""
    steps: int
    """Steps before that position, over all epochs."""
    examples: int
    """Examples before that position, over all epochs."""
