"""Sandblaster L-BFGS's messages (the conventions of ``downpour.messages`` hold here too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# ================================================================ Sandblaster L-BFGS
#
# The coordinator runs L-BFGS (lbfgs.py) and only ever sends and receives the messages below
# that carry no tensor: vector programs to the shards (scalars back), portion assignments to
# the replicas (loss sums back). Parameters and gradients go between replicas and shards.


@dataclass(frozen=True, slots=True)
class Op:
    """One vector operation of a program, run by every shard on its own slice. Ops never
    change a vector in place: each writes a new tensor under its destination name."""

    kind: str
    """``copy`` (b = a, an alias), ``scale`` (b = alpha a), ``axpy`` (b = b + alpha a), ``mul``
    (b = b * a, coefficient-wise), ``drop`` (forget a); reductions, whose partial results the
    coordinator combines: ``dot`` (a . b, summed), ``absmax`` (max |a|, maxed), ``abssum``
    (sum |a|, summed)."""
    a: str
    """Name of the source vector."""
    b: str = ""
    """Name of the destination (or second) vector."""
    alpha: float = 0.0
    """The scalar of scale and axpy."""


@dataclass(frozen=True, slots=True)
class VectorOps:
    """Coordinator -> shard: run these ops in order on your slice; reply ``VectorResults``."""

    ops: tuple[Op, ...]
    """The program."""
    tag: int = 0
    """Matches the replies to the request."""


@dataclass(frozen=True, slots=True)
class VectorResults:
    """Shard -> coordinator: the partial results of the program's reductions, in op order."""

    shard: int
    """Index of the replying shard."""
    tag: int
    """The request's tag."""
    values: tuple[float, ...]
    """One partial result per reduction op."""


@dataclass(frozen=True, slots=True)
class Evaluate:
    """L-BFGS -> its driver: the loss at vector ``"w"`` on a batch; the gradient lands in
    ``"gw"``. (Not sent between actors: the coordinator turns it into portions.)"""

    batch: int
    """Which batch: 0 for the whole training set, else the batch of that L-BFGS step."""


@dataclass(frozen=True, slots=True)
class ConnectSandblaster:
    """Driver -> coordinator and replicas: who the others are."""

    shards: tuple[Any, ...]
    """Refs of the parameter shards, by index."""
    replicas: tuple[Any, ...]
    """Refs of the replicas, by index."""
    coordinator: Any
    """Ref of the coordinator."""


@dataclass(frozen=True, slots=True)
class StartEvaluation:
    """Coordinator -> shard: a function evaluation begins; ``"w"`` is the point, lent to the
    replicas that fetch it; forget gradient sums of earlier evaluations."""

    evaluation: int
    """Function evaluation number (from 1)."""


@dataclass(frozen=True, slots=True)
class Assign:
    """Coordinator -> replica: compute the gradient of one portion."""

    evaluation: int
    """Function evaluation the portion belongs to; the replica fetches ``"w"`` from the shards
    when it has not yet for this evaluation."""
    batch: int
    """Batch of the evaluation (selects the examples; see ``portions.portion_indices``)."""
    portion: int
    """Index of the portion within the batch."""
    generation: int
    """Stamp for the replica's pushes: bumped when the replica was restarted, so what an
    earlier incarnation pushed is told apart."""
    step: int
    """How many portions this replica was assigned before this one (fault plans key on it)."""


@dataclass(frozen=True, slots=True)
class FetchPoint:
    """Replica -> shard: send me your slice of ``"w"`` for this evaluation."""

    evaluation: int
    """The evaluation whose point is wanted."""


@dataclass(frozen=True, slots=True)
class Point:
    """Shard -> replica: its slice of ``"w"``, lent (never changed by the shard)."""

    shard: int
    """Index of the replying shard."""
    evaluation: int
    """The evaluation the point belongs to."""
    values: torch.Tensor
    """The slice of ``"w"``."""


@dataclass(frozen=True, slots=True)
class PortionDone:
    """Replica -> coordinator: a portion's gradient is computed (and held until the verdict)."""

    replica: int
    """Replica index."""
    generation: int
    """The generation of the assignment."""
    evaluation: int
    """Evaluation of the portion."""
    portion: int
    """Portion index."""
    loss_sum: float
    """Sum of the per-example losses of the portion."""
    examples: int
    """Examples in the portion."""
    crossed_bytes: int = 0
    """Bytes its partitions sent each other within their stages computing it (0 unsplit)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Coordinator -> replica: whether the portion's gradient counts (first result wins)."""

    evaluation: int
    """Evaluation of the portion."""
    portion: int
    """Portion index."""
    accepted: bool
    """True: add it to the accrued sum; False: a copy already counted, drop it."""


@dataclass(frozen=True, slots=True)
class Flush:
    """Coordinator -> replica: every portion of the evaluation is done; push what is accrued."""

    evaluation: int
    """The evaluation."""


@dataclass(frozen=True, slots=True)
class PushGradient:
    """Replica -> shard: the summed gradient of accepted portions, the shard's slice."""

    evaluation: int
    """The evaluation."""
    replica: int
    """Replica index."""
    generation: int
    """The replica's generation when it computed them."""
    portions: int
    """How many accepted portions the sum covers."""
    grad: torch.Tensor
    """Sum of the portions' gradients (of summed, not averaged, losses) over the slice."""


@dataclass(frozen=True, slots=True)
class Reduce:
    """Coordinator -> shard: once pushes covering ``expected`` have arrived, set ``"gw"`` to
    their sum divided by ``examples`` and reply ``Reduced``. Pushes of other generations (a
    replica that died) do not count."""

    evaluation: int
    """The evaluation."""
    round: int
    """Bumped when a replica's death makes an earlier Reduce of the evaluation void."""
    expected: tuple[tuple[int, int, int], ...]
    """``(replica, generation, portions)`` per replica that pushes for the evaluation."""
    examples: int
    """Examples in the batch (the gradient is of the mean loss)."""


@dataclass(frozen=True, slots=True)
class Reduced:
    """Shard -> coordinator: ``"gw"`` holds the evaluation's gradient."""

    shard: int
    """Index of the replying shard."""
    evaluation: int
    """The evaluation."""
    round: int
    """The Reduce's round."""


@dataclass(frozen=True, slots=True)
class VectorSnapshot:
    """Driver -> shard: send a copy of a named vector (the final ``"x"``, tests' ``"g"``)."""

    name: str
    """Vector name."""
    tag: int = -1
    """Matches the reply to the request (a step number when tracing, else -1)."""


@dataclass(frozen=True, slots=True)
class VectorSlice:
    """Shard -> driver: a copy of its slice of a named vector."""

    shard: int
    """Index of the replying shard."""
    name: str
    """Vector name."""
    values: torch.Tensor
    """The copy."""
    tag: int = -1
    """The request's tag."""


@dataclass(frozen=True, slots=True)
class VectorsRequest:
    """Coordinator (or driver) -> shard: send every vector you hold to ``reply_to`` (a
    checkpoint, at a step's end, before the next vector program: the coordinator itself
    never holds a parameter-sized vector, so the slices go to the driver)."""

    tag: int
    """The step the checkpoint is of."""
    reply_to: Any = None
    """Whom to answer (None: the sender)."""


@dataclass(frozen=True, slots=True)
class ShardVectors:
    """Shard -> coordinator: its slice of every vector (ops never write in place: no copy)."""

    shard: int
    """Index of the replying shard."""
    tag: int
    """The request's tag."""
    vectors: dict[str, torch.Tensor]
    """Vector name -> its slice."""


@dataclass(frozen=True, slots=True)
class CoordinatorState:
    """Coordinator -> driver: L-BFGS's state after ``step`` (scalars: the step, history
    slots, their rho, the scaling, counters; see ``lbfgs.StepEnd.state``). With every shard's
    ``ShardVectors`` of that step, a checkpoint."""

    step: int
    """The step it is the state after."""
    state: dict[str, Any]
    """JSON."""


@dataclass(frozen=True, slots=True)
class StopAtStepEnd:
    """Driver -> coordinator, after a stop signal: end the run at the end of the step under
    way, with a checkpoint of it (its state and ``VectorsRequest`` to the shards, as a due
    checkpoint), then answer :class:`StoppedAtStepEnd` and run no further program. At once,
    with none, if no step of this run has ended yet (nothing new to write)."""


@dataclass(frozen=True, slots=True)
class StoppedAtStepEnd:
    """Coordinator -> driver: the run stopped at the end of ``step`` (None: before any step
    of this run ended, or at a step without a state to write: nothing written)."""

    step: int | None
    """The step whose checkpoint was asked for (after its ``CoordinatorState``)."""


@dataclass(frozen=True, slots=True)
class SandblasterDone:
    """Coordinator -> driver: the run finished; its scalars (parameters stay on the shards)."""

    loss: float
    """Loss at the final parameters (on the last batch evaluated)."""
    steps: int
    """L-BFGS iterations."""
    function_evals: int
    """Function evaluations, line search included."""
    stop: str
    """Why L-BFGS stopped."""
    losses: tuple[float, ...]
    """Loss after each step."""
    portions_done: tuple[int, ...]
    """Per replica: portions whose result counted."""
    portions_computed: tuple[int, ...]
    """Per replica: portions it reported, counted or dropped."""
    backup_portions: int
    """Backup copies handed out (a portion already assigned to another replica)."""
    backup_wins: int
    """Portions whose counted result came from a backup copy."""
    duplicates_dropped: int
    """Results dropped because another copy of the portion counted first (or came late)."""
    reassigned: int
    """Portions handed out again because their replica died."""
    coordinator_bytes: int
    """Bytes (pickled) of every message to and from the coordinator."""
    coordinator_messages: int
    """Messages to and from the coordinator."""
    train_s: float
    """Seconds from the first evaluation to the end."""
    examples: int
    """Examples whose gradient counted, over all evaluations."""
    restarts: int
    """Replicas that died and were restarted."""
    diverged: str = ""
    """Why L-BFGS could not go on, when ``stop`` is ``diverged`` (a NaN or Inf met)."""
    partition_bytes: int = 0
    """Bytes the replicas' partitions sent each other within their stages, every portion
    computed counted (Downpour's ``partition_bytes``); 0 without partitions."""
    checkpoints: dict[str, Any] = field(default_factory=dict)
    """What checkpointing did (``checkpoint.Checkpointer.stats``); empty without it."""


@dataclass(frozen=True, slots=True)
class Tick:
    """Replica -> itself: one turn of a simulated slow-down on a one-thread runtime (where a
    sleep would stop every actor): the portion's result goes out when ``left`` reaches 0."""

    left: int
    """Turns still to wait."""


# ================================================================ a replica split into partitions
#
# With stages x partitions > 1 a replica is its own actor (the coordinator's contact: it fetches
# the point, cuts the portion, takes the loss, holds and pushes the gradient sums) and S x P
# partition actors, each holding one block of one stage (``core.blocks``). Every message of a
# portion's pass carries its *ticket*, ``(generation, n)``: the replica's generation (bumped by
# the coordinator when the replica restarts) and its count of passes started; a partition drops
# what it holds of an older ticket when a newer one arrives, and ignores an older one's messages.
# ``step`` is the replica's ``Assign.step`` of the portion (fault plans key on it).

Ticket = tuple[int, int]
"""``(generation, n)``: one pass of one portion through a split replica (ordered)."""


@dataclass(frozen=True, slots=True)
class ConnectReplica:
    """Driver -> a split replica: its partitions."""

    partitions: tuple[Any, ...]
    """Refs of its partitions, by owner ``stage * partitions + block``."""


@dataclass(frozen=True, slots=True)
class ConnectPartition:
    """Driver -> partition: who the others are."""

    replica: Any
    """Ref of its replica (the actor the coordinator talks to)."""
    peers: tuple[Any, ...]
    """Refs of its stage's partitions, by block."""
    previous: tuple[Any, ...] | None
    """Refs of the previous stage's partitions (None: the first stage)."""
    next: tuple[Any, ...] | None
    """Refs of the next stage's partitions (None: the last stage)."""


@dataclass(frozen=True, slots=True)
class PartitionWeights:
    """Replica -> partition: its ranges of the point ``"w"`` of an evaluation, end to end."""

    evaluation: int
    """The evaluation the point belongs to."""
    values: torch.Tensor
    """The partition's parameters (its ranges of the flat space, in order)."""


@dataclass(frozen=True, slots=True)
class PartitionForward:
    """Replica -> each partition of the first stage: the portion's inputs, all of them."""

    ticket: Ticket
    step: int
    evaluation: int
    """The evaluation whose point the pass uses."""
    inputs: torch.Tensor


@dataclass(frozen=True, slots=True)
class PartitionInput:
    """Partition of stage s -> every partition of stage s + 1: its piece of the stage's
    output (the receiver assembles the whole input from every piece)."""

    ticket: Ticket
    step: int
    evaluation: int
    src: int
    """The sending block."""
    piece: torch.Tensor


@dataclass(frozen=True, slots=True)
class PartitionExchange:
    """Partition -> another of its stage: the part of its piece the other's strip of a split
    layer reads (``core.blocks.Transfer``)."""

    ticket: Ticket
    step: int
    layer: int
    """The layer (within the stage) whose input it is."""
    src: int
    values: torch.Tensor


@dataclass(frozen=True, slots=True)
class PartitionExchangeGrad:
    """Partition -> another of its stage: the gradient of the part of the other's piece it
    read for ``layer`` (its owner sums what comes back)."""

    ticket: Ticket
    step: int
    layer: int
    src: int
    grad: torch.Tensor


@dataclass(frozen=True, slots=True)
class PartitionOutput:
    """Partition of the last stage -> replica: its piece of the model's output."""

    ticket: Ticket
    src: int
    piece: torch.Tensor


@dataclass(frozen=True, slots=True)
class PartitionGrad:
    """Replica -> each partition of the last stage (``src`` -1): the gradient of its output
    piece; partition of stage s + 1 -> each of stage s: its partial gradient of the receiver's
    piece (the receiver sums one from each)."""

    ticket: Ticket
    step: int
    src: int
    grad: torch.Tensor


@dataclass(frozen=True, slots=True)
class PartitionParamGrad:
    """Partition -> replica: the gradient of the portion's loss sum with respect to the
    partition's parameters (its ranges of the flat space, in order)."""

    ticket: Ticket
    owner: int
    """``stage * partitions + block``."""
    grad: torch.Tensor
    crossed_bytes: int = 0
    """Bytes it sent the other blocks of its stage in this pass (``PartitionExchange`` and
    ``PartitionExchangeGrad``)."""


@dataclass(frozen=True, slots=True)
class PartitionRestarted:
    """Partition -> replica: it was restarted (its point and its pass are lost): send the
    point again and redo the portion under way."""

    owner: int
