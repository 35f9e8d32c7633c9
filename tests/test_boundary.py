"""The message boundary: a tensor in a message is never mutated after it is sent.

Shards lend their values in fetch replies (copy on write); stages push the tensors autograd
returned. These tests drive the actors by hand and check both halves of that contract, and that
the common case (one replica, n_fetch = 1) really copies nothing.
"""

from __future__ import annotations

import pytest
import torch
from support import RecordingContext
from torch import nn

from distbelief.algorithms.downpour.messages import (
    ConnectStage,
    Fetch,
    FetchReply,
    Forward,
    Push,
    ShardSnapshot,
    Snapshot,
)
from distbelief.algorithms.downpour.parameter_shard import ParameterShard
from distbelief.algorithms.downpour.stage import Stage
from distbelief.core.layout import Layout


def one_segment_shard(n: int = 4) -> tuple[ParameterShard, RecordingContext]:
    layout = Layout.build([n], shards=1)
    shard = ParameterShard(0, torch.ones(n), 0, layout.segments_of_shard(0), "sgd", 0.5)
    ctx = RecordingContext()
    shard.bind(ctx)
    return shard, ctx


def fetch(shard: ParameterShard, ctx: RecordingContext, replica: int) -> FetchReply:
    shard.on_fetch(Fetch(replica, 0), "stage")
    ((_, reply),) = ctx.take()
    assert isinstance(reply, FetchReply)
    return reply


def push(shard: ParameterShard, replica: int, version: int, done_reading: bool = True) -> None:
    shard.on_push(Push(replica, 0, (torch.ones(4),), version, done_reading), "stage")


def test_lent_values_do_not_change_while_another_replica_updates_the_segment():
    shard, ctx = one_segment_shard()
    lent = fetch(shard, ctx, replica=0)
    shard.on_snapshot(Snapshot(-1), "master")
    ((_, snap),) = ctx.take()
    assert isinstance(snap, ShardSnapshot)
    push(shard, replica=1, version=0)  # replica 0 still reads `lent`: the shard copies
    assert torch.equal(shard.weights, torch.full((4,), 0.5))
    assert torch.equal(lent.weights, torch.ones(4)) and torch.equal(snap.weights, torch.ones(4))
    assert shard.stats()["updates_applied"] == 1


def test_a_push_not_done_reading_keeps_the_pushers_values_intact():
    shard, ctx = one_segment_shard()
    lent = fetch(shard, ctx, replica=0)
    push(shard, replica=0, version=lent.version, done_reading=False)  # n_fetch > 1: reads on
    push(shard, replica=0, version=lent.version, done_reading=False)
    assert torch.equal(lent.weights, torch.ones(4))
    assert torch.equal(shard.weights, torch.zeros(4))


def test_one_replica_fetching_every_step_copies_no_parameters():
    shard, ctx = one_segment_shard()
    first = fetch(shard, ctx, replica=0)
    push(shard, replica=0, version=first.version)  # done reading: updated in place
    second = fetch(shard, ctx, replica=0)
    assert second.weights.data_ptr() == first.weights.data_ptr()
    assert torch.equal(second.weights, torch.full((4,), 0.5)) and second.version == 1
    # The other replica's lease ends with a new fetch or its own push, not with replica 0's.
    fetch(shard, ctx, replica=1)
    push(shard, replica=0, version=1)
    third = fetch(shard, ctx, replica=0)
    assert third.weights.data_ptr() != second.weights.data_ptr()
    assert torch.equal(second.weights, torch.full((4,), 0.5))


def _linear_stage(n_push: int, local_lr: float = 0.0, shards: int = 2) -> Stage:
    torch.manual_seed(0)
    layer = nn.Linear(64, 128)  # weight 8,192 elements, bias 128
    layout = Layout.build([8192 + 128], shards=shards, tensor_sizes=[8192, 128])
    stage = Stage(
        0,
        0,
        [layer],
        layout.segments_of_stage(0),
        0,
        lambda out, t: ((out - t) ** 2).mean(),
        n_fetch=100,
        n_push=n_push,
        local_lr=local_lr,
    )
    stage.bind(RecordingContext())
    stage.on_connect(ConnectStage(None, None, tuple(f"s{k}" for k in range(shards)), "data"), None)
    return stage


@pytest.mark.parametrize("shared", [False, True])
def test_a_fetch_to_keep_gets_a_copy_of_its_own_that_no_update_or_fetch_changes(shared):
    """A partition keeps its fetch's values as its version (``Fetch.keep``): the reply is a
    copy made for it, neither the shard's values nor a buffer a later fetch writes into."""
    import contextlib

    shard, ctx = one_segment_shard()
    if shared:
        shard.share_memory(contextlib.nullcontext())
    shard.on_fetch(Fetch(0, 0, keep=True), "partition")
    ((_, kept),) = ctx.take()
    assert torch.equal(kept.weights, torch.ones(4)) and kept.version == 0
    assert kept.weights.data_ptr() != shard.held[0].values.data_ptr()
    push(shard, replica=0, version=0)  # updated in place: no reader was registered
    shard.on_fetch(Fetch(0, 0, keep=True), "partition")
    ((_, second),) = ctx.take()
    assert torch.equal(second.weights, torch.full((4,), 0.5)) and second.version == 1
    assert torch.equal(kept.weights, torch.ones(4))  # the first is as it was sent
    assert not shard.held[0].readers


@pytest.mark.parametrize("n_push", [1, 2])
def test_pushed_gradients_are_not_changed_by_the_stage_afterwards(n_push):
    # One stage over two shards of 4,160: the weight straddles them. Shard 0's piece is a slice
    # of the weight's gradient; shard 1's merges the weight's small rest with the bias.
    stage = _linear_stage(n_push)
    assert [[(p.parts, p.in_place) for p in pieces] for pieces in stage.pieces] == [
        [(((0, 0, 4160),), False)],
        [(((0, 4160, 8192), (1, 0, 128)), False)],
    ]
    ctx = stage.ctx
    stage.fetched = True  # with n_fetch=100 no fetch is due: pushes only
    x, t = torch.randn(4, 64), torch.randn(4, 128)
    for step in range(1, n_push + 1):
        stage.on_forward(Forward(step, x * step, t), "data")
    sent = [m for _, m in ctx.take() if isinstance(m, Push)]
    assert [[g.numel() for g in m.grads] for m in sent] == [[4160], [4160]]
    assert not any(m.done_reading for m in sent)
    first = [[g.clone() for g in m.grads] for m in sent]
    for step in range(n_push + 1, 4 * n_push + 1):
        stage.on_forward(Forward(step, x * step, t), "data")
    for m, copies in zip(sent, first):
        for g, c in zip(m.grads, copies):
            assert torch.equal(g, c)


def test_a_stage_reads_lent_values_in_place_and_never_writes_them():
    stage = _linear_stage(n_push=1, shards=1)
    lent = torch.arange(8192 + 128, dtype=torch.float32)
    stage.fetch()  # a reply is read only as the answer to a fetch
    stage.on_fetch_reply(FetchReply(0, lent, 3), "s0")
    weight, bias = stage.params
    assert weight.data_ptr() == lent.data_ptr()  # read in place, no copy
    assert bias.data_ptr() == lent[8192:].data_ptr()
    assert torch.equal(bias.detach(), lent[8192:])

    stepping = _linear_stage(n_push=1, local_lr=0.1, shards=1)
    stepping.on_forward(Forward(1, torch.randn(4, 64), torch.randn(4, 128)), "data")  # fetches
    stepping.on_fetch_reply(FetchReply(0, lent, 3), "s0")  # then runs the step
    assert any(isinstance(m, Push) for _, m in stepping.ctx.take())
    assert torch.equal(lent, torch.arange(8192 + 128, dtype=torch.float32))  # stepped a copy
    assert not torch.equal(stepping.weights, lent)


def test_finiteness_check_of_pushed_pieces_is_exact():
    from distbelief.algorithms.downpour.parameter_shard import finite

    ok = [torch.ones(3), torch.zeros(2)]
    assert finite(ok) and finite(ok[:1])
    assert not finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not finite([torch.tensor([float("inf")]), torch.tensor([-float("inf")])])  # sum: nan
    assert not finite([torch.tensor([float("-inf"), 1.0])])
    huge = torch.full((4,), 3e38)  # its float32 sum overflows, yet every element is finite
    assert finite([huge]) and finite([huge, huge])
