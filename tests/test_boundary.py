"""Copy at the boundary: a tensor in a message is never mutated after it is sent."""

from __future__ import annotations

import torch
from test_master import RecordingContext
from torch import nn

from distbelief.actors import ParameterShard, Stage
from distbelief.layout import Layout
from distbelief.messages import (
    ConnectStage,
    Fetch,
    FetchReply,
    Forward,
    Push,
    ShardSnapshot,
    Snapshot,
)


def test_shard_replies_are_copies_that_later_pushes_do_not_touch():
    layout = Layout.build([4], shards=1)
    shard = ParameterShard(0, torch.ones(4), 0, layout.segments_of_shard(0), "sgd", 0.5)
    ctx = RecordingContext()
    shard.bind(ctx)
    shard.on_fetch(Fetch(0), "stage")
    shard.on_snapshot(Snapshot(-1), "master")
    (_, reply), (_, snap) = ctx.take()
    assert isinstance(reply, FetchReply) and isinstance(snap, ShardSnapshot)
    shard.on_push(Push(0, torch.ones(4), reply.version), "stage")
    assert torch.equal(shard.weights, torch.full((4,), 0.5))
    assert torch.equal(reply.weights, torch.ones(4)) and torch.equal(snap.weights, torch.ones(4))


def test_pushed_gradients_are_not_changed_by_the_stage_afterwards():
    torch.manual_seed(0)
    layout = Layout.build([3 * 2 + 2], shards=2)  # one stage over two shards: two segments
    stage = Stage(
        0,
        0,
        [nn.Linear(3, 2)],
        layout.segments_of_stage(0),
        0,
        lambda out, t: ((out - t) ** 2).mean(),
        n_fetch=100,
        n_push=1,
    )
    ctx = RecordingContext()
    stage.bind(ctx)
    stage.on_connect(ConnectStage(None, None, ("s0", "s1"), "data"), None)
    stage.fetched = True  # with steps 1..4 and n_fetch=100 no fetch is due: pushes only
    x, t = torch.randn(4, 3), torch.randn(4, 2)
    stage.on_forward(Forward(1, x, t), "data")
    first = [m.grad.clone() for _, m in ctx.sent if isinstance(m, Push)]
    sent = [m.grad for _, m in ctx.take() if isinstance(m, Push)]
    assert len(sent) == 2
    for step in range(2, 5):
        stage.on_forward(Forward(step, x * step, t), "data")
    for a, b in zip(sent, first):
        assert torch.equal(a, b)
