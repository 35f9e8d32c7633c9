"""SandblasterShard: one slice of every vector Sandblaster's L-BFGS works with."""

from __future__ import annotations

import torch

from ...runtime.base import Actor, receives
from .lbfgs import run_op
from .messages import (
    FetchPoint,
    Point,
    PushGradient,
    Reduce,
    Reduced,
    ShardVectors,
    VectorOps,
    VectorResults,
    VectorSlice,
    VectorSnapshot,
    VectorsRequest,
)


class SandblasterShard(Actor):
    """Holds its slice of the parameters ``"x"``, the gradient ``"g"``, the direction ``"d"``,
    the point being evaluated ``"w"`` and its part of the (s, y) history ring, by name; runs
    the coordinator's vector programs on them and answers with partial reductions (scalars).

    Replicas fetch ``"w"`` (lent: ops never change a tensor in place) and push gradient sums
    of accepted portions, per replica and generation; ``Reduce`` turns exactly the expected
    ones into ``"gw"``, the gradient of the evaluation.
    """

    def __init__(
        self, index: int, initial: torch.Tensor, vectors: dict[str, torch.Tensor] | None = None
    ) -> None:
        self.index = index
        self.vectors: dict[str, torch.Tensor] = {"x": initial.clone()}
        if vectors is not None:  # resumed: every vector as a checkpoint holds it
            self.vectors = {name: v.clone() for name, v in vectors.items()}
        self.evaluation = 0  # the evaluation whose pushes ``sums`` holds
        self.sums: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # (replica, gen) ->
        self.reduce: tuple[Reduce, object] | None = None  # waiting for pushes
        self.expected: dict[tuple[int, int], int] = {}  # of the Reduce waiting: key -> portions
        self.missing: set[tuple[int, int]] = set()  # its keys whose pushes are not all in

    @receives(VectorOps)
    def on_vector_ops(self, msg: VectorOps, sender: object) -> None:
        values = [r for op in msg.ops if (r := run_op(self.vectors, op)) is not None]
        self.ctx.tell(sender, VectorResults(self.index, msg.tag, tuple(values)))

    @receives(FetchPoint)
    def on_fetch_point(self, msg: FetchPoint, sender: object) -> None:
        # "w" was set by a program the coordinator saw finish before it assigned portions.
        self.ctx.tell(sender, Point(self.index, msg.evaluation, self.vectors["w"]))

    def _start(self, evaluation: int) -> bool:
        """Forget older evaluations' sums; False if ``evaluation`` is itself an old one."""
        if evaluation < self.evaluation:
            return False
        if evaluation > self.evaluation:
            self.evaluation = evaluation
            self.sums.clear()
        return True

    @receives(PushGradient)
    def on_push(self, msg: PushGradient, sender: object) -> None:
        if not self._start(msg.evaluation):
            return
        key = (msg.replica, msg.generation)
        if key in self.sums:
            total, count = self.sums[key]
            self.sums[key] = (total + msg.grad, count + msg.portions)  # out of place
        else:
            self.sums[key] = (msg.grad, msg.portions)
        if self.reduce is not None and self.reduce[0].evaluation == msg.evaluation:
            if key in self.expected:  # (one already complete is checked again: too many)
                self._check(key)
            self._try_reduce()

    @receives(Reduce)
    def on_reduce(self, msg: Reduce, sender: object) -> None:
        if not self._start(msg.evaluation):
            return
        self.reduce = (msg, sender)
        # What is still on its way, checked once here and then push by push: a scan of the
        # expected sums at every push was quadratic in the replicas (2,000 of them).
        self.expected = {(r, g): portions for r, g, portions in msg.expected}
        self.missing = set(self.expected)
        for key in msg.expected:
            self._check(key[:2])
        self._try_reduce()

    def _check(self, key: tuple[int, int]) -> None:
        """Whether the pushes of ``key`` (replica, generation) are all in."""
        got, portions = self.sums.get(key), self.expected[key]
        if got is None or got[1] < portions:
            return  # pushes still on their way
        if got[1] > portions:
            raise RuntimeError(
                f"replica {key[0]} pushed {got[1]} portions, {portions} were accepted"
            )
        self.missing.discard(key)

    def _try_reduce(self) -> None:
        if self.reduce is None or self.missing:
            return
        msg, sender = self.reduce
        if msg.evaluation != self.evaluation:
            return
        parts = [self.sums[(replica, generation)][0] for replica, generation, _ in msg.expected]
        self.reduce = None
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        self.vectors["gw"] = total / msg.examples
        self.ctx.tell(sender, Reduced(self.index, msg.evaluation, msg.round))

    @receives(VectorsRequest)
    def on_vectors_request(self, msg: VectorsRequest, sender: object) -> None:
        reply_to = sender if msg.reply_to is None else msg.reply_to
        self.ctx.tell(reply_to, ShardVectors(self.index, msg.tag, dict(self.vectors)))

    @receives(VectorSnapshot)
    def on_snapshot(self, msg: VectorSnapshot, sender: object) -> None:
        self.ctx.tell(
            sender, VectorSlice(self.index, msg.name, self.vectors[msg.name].clone(), msg.tag)
        )
