"""Partitions within a stage (``partitions``): the block passes against ``run_blocks``, a split
replica against a plain torch loop, the composed layout on every runtime, a partition killed,
a checkpoint resumed, and every bad input refused before anything runs."""

from __future__ import annotations

import copy
import math
import random
import signal

import pytest
import torch
import torch.nn.functional as F
from support import RecordingContext, run, separable_data
from torch import nn

import distbelief
from distbelief.algorithms.downpour.driver import (
    _positions,
    build_layout,
    partition_owners,
    stage_plans,
)
from distbelief.algorithms.downpour.messages import ConnectPartition, FetchReply, Forward
from distbelief.algorithms.downpour.parameter_shard import ParameterShard
from distbelief.algorithms.downpour.partition import Partition
from distbelief.algorithms.downpour.recovery import split_checkpoint
from distbelief.core.blocks import (
    BlockPass,
    CutEnds,
    block_parameters,
    cut_elements,
    plan_split,
    run_blocks,
    stage_cut,
)
from distbelief.core.flat import flatten
from distbelief.core.layout import Layout
from distbelief.core.partition import layer_sizes, resolve_split_points, split_layers
from distbelief.data.inputs import replica_batches
from distbelief.errors import ConfigError
from distbelief.nn import LocallyConnected1d
from distbelief.runtime.processes import place
from distbelief.runtime.ray.placement import plan_placement


def toy(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randint(0, classes, (n,), generator=g)


def mlp_net() -> nn.Sequential:
    torch.manual_seed(0)  # widths 13, 7, 5: no P of 2..4 divides them all
    return nn.Sequential(nn.Linear(10, 13), nn.ReLU(), nn.Linear(13, 7), nn.Tanh(), nn.Linear(7, 5))


def local_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 10)),
        LocallyConnected1d(1, 3, 3, 10, padding=1),  # 10 positions
        nn.ReLU(),
        LocallyConnected1d(3, 2, 3, 10, stride=2, padding=1),  # 5 positions, halo 1
        nn.Flatten(),
        nn.Linear(10, 5),
    )


# ------------------------------------------------------------------------ the pure block pass


def _exchange(passes, queue, rng, backward):
    """Deliver the queued sends in random order; a pass that returned early (``more``: its
    halo first, its interior next) is carried on at a random later point, as a message is."""
    while queue:
        src, item = queue.pop(rng.randrange(len(queue)))
        if item == "more":
            bp = passes[src]
            sends = bp.backward() if backward else bp.forward()
            queue += [(src, s) for s in sends] + [(src, "more")] * bp.more
            continue
        dst, layer, values = item
        if backward:
            passes[dst].receive_grad(layer, src, values)
            sends = passes[dst].backward()
        else:
            passes[dst].receive(layer, src, values)
            sends = passes[dst].forward()
        queue += [(dst, s) for s in sends] + [(dst, "more")] * passes[dst].more


def halo_net() -> list[nn.Module]:
    """Locally-connected layers of several kernels and strides, each cut along its input's
    positions (so each is overlapped: interior first, edges once the halos are in)."""
    torch.manual_seed(1)
    return [
        nn.Unflatten(1, (1, 10)),
        LocallyConnected1d(1, 3, 3, 10, padding=1),
        nn.ReLU(),
        LocallyConnected1d(3, 3, 5, 10, padding=2),  # halo 2
        nn.ReLU(),
        LocallyConnected1d(3, 2, 3, 10, stride=2, padding=1),  # 5 positions
        nn.Tanh(),
        LocallyConnected1d(2, 2, 2, 5, bias=False),  # 4 positions, no padding: edges differ
        nn.Flatten(),
        nn.Linear(8, 7),
    ]


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("wants_input", [True, False])
@pytest.mark.parametrize(
    "overlap, net", [(False, "local"), (True, "local"), (False, "halo"), (True, "halo")]
)
def test_block_passes_with_messages_in_any_order_equal_run_blocks(parts, wants_input, overlap, net):
    if net == "local":
        layers = list(local_net()) + [nn.Tanh(), nn.Linear(5, 7)]
    else:
        layers = halo_net()
    plan = plan_split(layers, parts, (10,))
    x, g = torch.randn(6, 10), torch.randn(6, 7)
    ref = run_blocks(plan, layers, x, g)
    passes = [BlockPass(plan, b, layers, wants_input, overlap=overlap) for b in range(parts)]
    rng, queue = random.Random(parts), []
    for b, bp in enumerate(passes):
        params = [
            [p.detach().clone().requires_grad_() for p in block_parameters(lp, b, layer)]
            for lp, layer in zip(plan.layers, layers)
        ]
        queue += [(b, s) for s in bp.start(x, params)] + [(b, "more")] * bp.more
    if net == "halo":  # overlapped: each block sent its halo, left its interior for later
        assert [bp.more for bp in passes] == [overlap and parts > 1] * parts
    _exchange(passes, queue, rng, backward=False)
    torch.testing.assert_close(plan.output.assemble([bp.output for bp in passes]), ref.output)
    for b, grad in enumerate(plan.output.cut(g)):
        queue += [(b, s) for s in passes[b].backward(grad)] + [(b, "more")] * passes[b].more
    _exchange(passes, queue, rng, backward=True)
    for b, bp in enumerate(passes):
        assert bp.done
        mine = [t for grads in bp.param_grads for t in grads]
        assert len(mine) == len(ref.param_grads[b])
        for got, want in zip(mine, ref.param_grads[b]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if wants_input:
        total = torch.stack([bp.input_grad for bp in passes]).sum(0)
        torch.testing.assert_close(total, ref.input_grad, rtol=1e-6, atol=1e-6)
    else:
        assert all(bp.input_grad is None for bp in passes)


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("cut_at", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("overlap", [False, True])
def test_a_stage_cut_sends_only_strips_and_equals_run_blocks(parts, cut_at, overlap):
    # The second stage starts with a locally-connected layer (kernels 5, 3 with stride 2, 2 with
    # no padding), or with an activation before one: each of its blocks gets only its strip
    # from the first stage's blocks, and the strips' gradients go back to be summed by their
    # owners.
    layers = halo_net()
    first, second = layers[:cut_at], layers[cut_at:]
    plan_a = plan_split(first, parts, (10,))
    plan_b = plan_split(second, parts, plan_a.output.shape)
    cut = stage_cut(plan_a, plan_b)
    assert cut is not None and cut.input == plan_a.output
    whole = math.prod(plan_a.output.shape) * parts  # every piece to every block
    assert cut_elements(plan_a, plan_b) == sum(t.elements for t in cut.transfers)
    if parts > 1:
        assert cut_elements(plan_a, plan_b) < whole / 2 + whole / parts
    x, g = torch.randn(6, 10), torch.randn(6, 7)
    ref_b = run_blocks(
        plan_b, second, run_blocks(plan_a, first, x, torch.zeros(6, *plan_a.output.shape)).output, g
    )
    ref_a = run_blocks(plan_a, first, x, ref_b.input_grad)
    rng = random.Random(parts)

    def params(plan, stage_layers, b):
        return [
            [p.detach().clone().requires_grad_() for p in block_parameters(lp, b, layer)]
            for lp, layer in zip(plan.layers, stage_layers)
        ]

    passes_a = [BlockPass(plan_a, b, first, False, overlap) for b in range(parts)]
    ends_a = [CutEnds(b, None, cut) for b in range(parts)]
    ends_b = [CutEnds(b, cut, None) for b in range(parts)]
    queue = []
    for b, bp in enumerate(passes_a):
        queue += [(b, s) for s in bp.start(x, params(plan_a, first, b))] + [(b, "more")] * bp.more
    _exchange(passes_a, queue, rng, backward=False)
    passes_b = [BlockPass(plan_b, b, second, True, overlap, strip_input=True) for b in range(parts)]
    # what each block of the first stage sends across (CutEnds, as a partition actor uses it)
    sent = [(b, dst, v) for b, bp in enumerate(passes_a) for dst, v in ends_a[b].parts(bp.output)]
    rng.shuffle(sent)
    for b, bp in enumerate(passes_b):
        inbox: dict[int, torch.Tensor] = {}
        for src, dst, v in sent:
            if dst == b:
                assert ends_b[b].strip(inbox) is None  # not before every source's part is in
                inbox[src] = v
        strip = ends_b[b].strip(inbox)
        queue += [(b, s) for s in bp.start(strip, params(plan_b, second, b))]
        queue += [(b, "more")] * bp.more
    _exchange(passes_b, queue, rng, backward=False)
    torch.testing.assert_close(plan_b.output.assemble([bp.output for bp in passes_b]), ref_b.output)
    for b, grad in enumerate(plan_b.output.cut(g)):
        queue += [(b, s) for s in passes_b[b].backward(grad)] + [(b, "more")] * passes_b[b].more
    _exchange(passes_b, queue, rng, backward=True)
    back = [
        (b, src, g)
        for b, bp in enumerate(passes_b)
        for src, g in ends_b[b].input_grads(bp.input_grad)
    ]
    rng.shuffle(back)
    for b, bp in enumerate(passes_a):
        grad = ends_a[b].output_grad(bp.output, {dst: g for dst, src, g in back if src == b})
        torch.testing.assert_close(grad, plan_a.output.cut(ref_b.input_grad)[b])
        queue += [(b, s) for s in bp.backward(grad)] + [(b, "more")] * bp.more
    _exchange(passes_a, queue, rng, backward=True)
    for passes, ref in ((passes_a, ref_a), (passes_b, ref_b)):
        for b, bp in enumerate(passes):
            assert bp.done
            mine = [t for grads in bp.param_grads for t in grads]
            for got, want in zip(mine, ref.param_grads[b], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_stage_cut_sends_every_piece_where_a_layer_reads_all_of_its_input():
    layers = halo_net()  # the second stage starts with the Flatten, or with the Linear
    reshaped = [nn.Flatten(), nn.Unflatten(1, (3, 10)), *layers[3:]]  # a reshape, then local
    for first, second in (
        (layers[:8], layers[8:]),
        (layers[:9], layers[9:]),
        (layers[:3], reshaped),
    ):
        plan_a = plan_split(first, 2, (10,))
        plan_b = plan_split(second, 2, plan_a.output.shape)
        assert stage_cut(plan_a, plan_b) is None
        assert cut_elements(plan_a, plan_b) == math.prod(plan_a.output.shape) * 2


def test_interior_outputs_read_only_the_blocks_own_piece():
    from distbelief.core.blocks import _field, interior

    layers = halo_net()
    for parts in (2, 3, 4):
        plan = plan_split(layers, parts, (10,))
        for lp in plan.layers:
            if lp.kind != "local1d" or lp.input is None:
                continue
            layer = layers[lp.index]
            for b in range(parts):
                lo, hi = lp.output.ranges[b]
                own_lo, own_hi = lp.input.ranges[b]
                a, z = interior(lp, layer, b)
                assert lo <= a <= z <= hi
                inside = [
                    o for o in range(lo, hi)
                    if own_lo <= _field(lp, layer, o)[0] and _field(lp, layer, o)[1] <= own_hi
                ]  # fmt: skip
                assert list(range(a, z)) == inside  # all of them, and only them


def test_a_shard_holds_a_partitions_ranges_as_one_and_its_slice_in_order():
    layers = list(mlp_net())
    sizes = [p.numel() for layer in layers for p in layer.parameters()]
    layout = Layout.build([sum(sizes)], 2, sizes)
    owners = partition_owners(layout, stage_plans([layers], 3, (10,)))
    initial = flatten(layers)
    for k, (a, b) in enumerate(layout.shard_ranges):
        mine = [seg for o in owners for seg in o.segments if seg.shard == k]
        segs = tuple(sorted(mine, key=lambda seg: seg.start))
        shard = ParameterShard(k, initial[a:b], a, segs, "sgd", 0.1)
        assert len(shard.held) == len({s.stage for s in segs}) < len(segs)  # several per owner
        torch.testing.assert_close(shard.weights, initial[a:b], rtol=0, atol=0)
        state = shard.export_state()
        fresh = ParameterShard(k, torch.zeros(b - a), a, segs, "sgd", 0.1)
        fresh.restore(state)
        torch.testing.assert_close(fresh.weights, initial[a:b], rtol=0, atol=0)
        # A restarted shard restored from a checkpoint cuts its slice by the owners' ranges.
        where = _positions([segs], Layout(layout.total, (layout.shard_ranges[k],), (), ()))[0]
        lengths = {owner: len(held.values) for owner, held in shard.held.items()}
        cut = split_checkpoint(state, lengths, where)
        for owner, held in shard.held.items():
            torch.testing.assert_close(cut[owner].values, held.values, rtol=0, atol=0)


def test_a_killed_shard_is_restored_from_the_partitions_copies(tmp_path):
    x, y = separable_data(256)
    kw = dict(loss="cross_entropy", lr=0.1, batch_size=16, epochs=2, seed=3, optimizer="sgd",
              replicas=2, partitions=2, shards=2, checkpoint_dir=tmp_path / "c",
              checkpoint_every=4)  # fmt: skip
    faults = {"faults": ["kill:shard1@update=40"]}
    result = distbelief.train(local_net(), (x, y), runtime_options=faults, **kw)
    (record,) = result.stats["recoveries"]
    assert record["actor"] == "shard1" and record["restored_version"] > 0
    losses = [point["loss"] for point in result.history.train]
    assert losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------------ a split replica, trained


def plain_sgd(model, batches, lr):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return flatten(model.children())


@pytest.mark.parametrize("net", [mlp_net, local_net])
@pytest.mark.parametrize(
    "parts, shards, stages",
    [
        (1, 1, 1),
        (2, 3, 1),
        (3, 2, 1),
        (4, 1, 1),
        (2, 2, 2),
        (3, 1, 2),
        (2, 2, (3,)),
        (4, 1, (3,)),
        (3, 1, (2,)),
    ],
)
def test_one_replica_of_p_partitions_equals_the_plain_loop(net, parts, shards, stages):
    model = net()
    x, y = toy(400, 5)  # 25 steps of 16 an epoch: 50 steps
    result = distbelief.train(
        model, (x, y), loss="cross_entropy", lr=0.1, batch_size=16, epochs=2, seed=7,
        optimizer="sgd", partitions=parts, shards=shards, stages=stages,
    )  # fmt: skip
    batches = replica_batches(x, y, replica=0, seed=7, batch_size=16, epochs=2)
    expected = plain_sgd(model, batches, 0.1)
    assert not torch.equal(expected, flatten(model.children())), "the oracle must move"
    torch.testing.assert_close(flatten(result.model.children()), expected, rtol=1e-5, atol=1e-5)
    assert result.stats["steps"] == 50 and result.stats["staleness_max"] == 0
    # Counted, not timed: every transfer between blocks, both ways, per example.
    if stages == 1:
        crossing = plan_split(list(model), parts, (10,)).crossing_elements()
        assert result.stats["partition_bytes"] == (crossing * 2 * 800 * 4 if parts > 1 else 0)


def test_one_stage_of_partitions_takes_a_pipeline_depth():
    # The blocks of one stage overlap mini-batches too (one computes while it waits for
    # another's halo): pipeline_depth > 1 needs stages > 1 or partitions > 1.
    x, y = separable_data(256)
    kw = dict(loss="cross_entropy", lr=0.1, batch_size=16, epochs=2, seed=0, optimizer="sgd")
    result = distbelief.train(local_net(), (x, y), partitions=2, pipeline_depth=3, **kw)
    assert result.stats["steps"] == 32 and 0 < result.stats["staleness_max"] <= 2
    losses = [point["loss"] for point in result.history.train]
    assert losses[-1] < 0.6 * losses[0]
    with pytest.raises(ConfigError, match=r"^pipeline_depth: 2 .*partitions > 1"):
        distbelief.train(local_net(), (x, y), pipeline_depth=2, **kw)


def test_n_fetch_n_push_4_with_partitions_equal_summed_gradients_every_4_steps():
    model = mlp_net()
    x, y = toy(384, 5)  # 24 steps of 16 an epoch: a multiple of 4
    result = distbelief.train(
        model, (x, y), loss="cross_entropy", lr=0.1, batch_size=16, epochs=2, seed=7,
        optimizer="sgd", partitions=3, stages=2, shards=2, n_fetch=4, n_push=4,
    )  # fmt: skip
    batches = replica_batches(x, y, replica=0, seed=7, batch_size=16, epochs=2)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for i, (bx, by) in enumerate(batches):
        F.cross_entropy(m(bx), by).backward()
        if (i + 1) % 4 == 0:
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(
        flatten(result.model.children()), flatten(m.children()), rtol=1e-5, atol=1e-5
    )
    # (with SGD a push per step would give the same sum): one push per partition and shard
    stage_layers = split_layers(list(model), resolve_split_points(layer_sizes(list(model)), 2))
    owners = partition_owners(build_layout(stage_layers, 2), stage_plans(stage_layers, 3, (10,)))
    pairs = sum(len({seg.shard for seg in o.segments}) for o in owners)
    assert result.stats["updates_applied_total"] == 48 // 4 * pairs


def test_evaluation_warmstart_and_ctrl_c_with_partitions():
    x, y = separable_data(256)
    kw = dict(loss="cross_entropy", lr=0.1, batch_size=16, seed=0, optimizer="adagrad",
              replicas=2, stages=2, partitions=2, shards=2)  # fmt: skip
    result = distbelief.train(
        mlp_net(), (x, y), epochs=2, eval_data=(x, y), eval_every=128, warmstart_steps=4, **kw
    )
    evals = result.history.eval
    assert len(evals) >= 4 and evals[-1]["accuracy"] > 0.8
    # Ctrl-C: the run stops and keeps what it trained.
    model = mlp_net()

    def progress(report):
        if report.examples >= 256:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(distbelief.TrainingInterrupted) as info:
        distbelief.train(model, (x, y), epochs=50, progress=progress, **kw)
    trained = flatten(info.value.model.children())
    assert torch.isfinite(trained).all() and not torch.equal(trained, flatten(model.children()))


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "runtime, depth", [("local", 2), ("processes", 1), ("ray", 1)], indirect=["runtime"]
)
def test_replicas_stages_partitions_and_shards_compose_on_every_runtime(runtime, depth):
    x, y = separable_data(512)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2)
    )
    result = distbelief.train(
        model, (x, y), loss="cross_entropy", lr=0.1, batch_size=64, epochs=2, seed=0,
        optimizer="adagrad", replicas=2, stages=2, partitions=2, shards=2,
        pipeline_depth=depth, runtime=runtime,
    )  # fmt: skip
    assert result.stats["steps"] == 2 * 512 // 64  # few: a Ray hop costs about a millisecond
    assert accuracy(result.model, x, y) > 0.85  # chance is 0.5
    assert result.stats["partition_bytes"] > 0


def test_a_killed_partition_redoes_its_steps_and_each_counts_once():
    x, y = separable_data(256)
    model = local_net()
    kw = dict(loss="cross_entropy", lr=0.1, batch_size=16, epochs=2, seed=3, optimizer="sgd",
              stages=2, partitions=2, shards=2, pipeline_depth=2)  # fmt: skip
    kills = ["kill:replica0.stage0.part1@step=9", "kill:replica0.stage1.part0@step=20"]
    result = distbelief.train(model, (x, y), runtime_options={"faults": kills}, **kw)
    assert result.stats["restarts"] == 2
    assert result.stats["steps"] == 2 * 256 // 16  # each counted once
    losses = [point["loss"] for point in result.history.train]
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_partition_is_restarted_on_ray_and_the_run_completes(ray_session):
    pytest.importorskip("ray")
    x, y = separable_data(64)
    result = distbelief.train(
        local_net(), (x, y), loss="cross_entropy", lr=0.1, batch_size=16, epochs=2, seed=3,
        optimizer="sgd", partitions=2, runtime="ray",
        runtime_options={"faults": ["kill:replica0.stage0.part1@step=3"]},
    )  # fmt: skip
    assert result.stats["restarts"] == 1
    assert result.stats["steps"] == 2 * 64 // 16  # each counted once, the redone ones too
    killed, respawned = result.stats["pids"]["replica0.stage0.part1"]
    assert killed != respawned  # a new process took the partition's place
    losses = [point["loss"] for point in result.history.train]
    assert losses[-1] < losses[0]


def test_a_checkpoint_of_partitions_resumes(tmp_path):
    x, y = toy(160, 5)
    model = mlp_net()
    kw = dict(loss="cross_entropy", lr=0.1, batch_size=16, seed=7, optimizer="sgd",
              partitions=2, shards=2)  # fmt: skip
    ckpt = tmp_path / "ckpt"
    distbelief.train(model, (x, y), epochs=1, checkpoint_dir=ckpt, **kw)
    resumed = distbelief.train(model, (x, y), epochs=2, resume=ckpt, **kw)
    straight = distbelief.train(model, (x, y), epochs=2, **kw)
    torch.testing.assert_close(
        flatten(resumed.model.children()), flatten(straight.model.children()), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ConfigError, match="^partitions: .* taken with partitions 2"):
        distbelief.train(model, (x, y), epochs=2, resume=ckpt, **{**kw, "partitions": 3})


# ------------------------------------------------------------------------------ bad input

BAD = [
    (0, "partitions: must be an integer >= 1, got 0"),
    (1.5, "partitions"),
    ("2", "partitions"),
    (6, "partitions: 6 partitions but layer 4 \\(Linear\\) has only 5 output units"),
]


@pytest.mark.parametrize("value, message", BAD)
def test_bad_partitions_are_refused_naming_it(value, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        distbelief.train(mlp_net(), toy(64, 5), loss="cross_entropy", lr=0.1, batch_size=16,
                         epochs=1, partitions=value)  # fmt: skip


def test_partitions_is_an_integer():
    # (Sandblaster takes partitions too: tests/test_sandblaster_split.py)
    data = toy(64, 5)
    with pytest.raises(ConfigError, match="^partitions: must be an integer >= 1, got True"):
        distbelief.train(mlp_net(), data, loss="cross_entropy", lr=0.1, batch_size=16,
                         epochs=1, partitions=True)  # fmt: skip


def test_a_layer_that_cannot_be_split_is_refused_naming_it_and_its_stage():
    model = nn.Sequential(nn.Linear(10, 8), nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 1, 3))
    with pytest.raises(ConfigError, match=r"^partitions: layer 2 \(Conv1d\) cannot be split"):
        distbelief.train(model, toy(64, 6), loss="cross_entropy", lr=0.1, batch_size=16,
                         epochs=1, partitions=2)  # fmt: skip
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 8), nn.Softmax(1))
    with pytest.raises(ConfigError, match=r"Softmax\) cannot be split.*\(in stage 1"):
        distbelief.train(model, toy(64, 8), loss="cross_entropy", lr=0.1,
                         batch_size=16, epochs=1, partitions=2, stages=[2])  # fmt: skip


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--partitions", "0"], "partitions"),
        (["--partitions", "2.5"], "partitions"),
        (["--partitions", "11"], "partitions: 11 partitions but layer"),
    ],
)
def test_bad_partitions_on_the_command_exit_2(capsys, argv, names):
    code, out, err = run(capsys, "train", "digits", "--no-run-dir", *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], err


def test_the_command_trains_with_partitions(capsys):
    from support import run_json

    s = run_json(capsys, "train", "digits", "--partitions", "2", "--epochs", "2", "--seed", "0",
                 "--no-run-dir")  # fmt: skip
    assert s["partitions"] == 2 and s["partition_bytes"] > 0
    assert s["test_accuracy"] > 0.4  # chance is 0.1


# ------------------------------------------------------------------------------- placement


def test_processes_put_the_blocks_of_a_stage_on_different_workers():
    names = [f"data{r}" for r in range(2)] + [
        f"replica{r}.stage{s}.part{b}" for r in range(2) for s in range(2) for b in range(2)
    ]
    placed = place(names, workers=2)
    for r in range(2):
        for s in range(2):
            assert placed[f"replica{r}.stage{s}.part0"] != placed[f"replica{r}.stage{s}.part1"]
    one = place(["data0", "replica0.stage0.part0", "replica0.stage0.part1"], workers=2)
    assert one["replica0.stage0.part0"] != one["replica0.stage0.part1"]
    # without partitions: as before, a replica whole per worker
    assert place(["data0", "replica0.stage0", "data1", "replica1.stage0"], workers=2) == {
        "data0": 1, "replica0.stage0": 1, "data1": 2, "replica1.stage0": 2,
    }  # fmt: skip


def test_ray_puts_the_blocks_of_a_stage_on_different_nodes():
    names = ["shard0", "data0"] + [f"replica0.stage{s}.part{b}" for s in range(2) for b in range(2)]
    placed = plan_placement(names, ["n0", "n1"])
    for s in range(2):
        assert placed[f"replica0.stage{s}.part0"] != placed[f"replica0.stage{s}.part1"]


def test_the_simulated_runtime_runs_partitions():
    x, y = separable_data(256)
    result = distbelief.train(
        mlp_net(), (x, y), loss="cross_entropy", lr=0.1, batch_size=64, epochs=2, seed=0,
        optimizer="adagrad", stages=2, partitions=2, shards=2, runtime="simulated",
    )  # fmt: skip
    assert result.stats["steps"] == 8 and result.stats["virtual_s"] > 0


def test_with_n_fetch_2_a_partition_fetches_the_due_step_as_soon_as_the_step_before_is_done():
    layers = [nn.Linear(4, 3)]
    plans = stage_plans([layers], 1, (4,))
    (owner,) = partition_owners(build_layout([layers], 1), plans)
    part = Partition(
        0, 0, 0, plans[0], None, layers, owner.segments, owner.ranges,
        F.cross_entropy, n_fetch=2, n_push=2,
    )  # fmt: skip
    ctx = RecordingContext()
    part.bind(ctx)
    part.on_connect(ConnectPartition(None, ("self",), None, ("s0",), "data"), None)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    values = flatten(layers)

    def kinds() -> list[str]:
        return [type(m).__name__ for _, m in ctx.take()]

    part.on_forward(Forward(0, x, y), "data")
    assert kinds() == ["Fetch"]  # the first step fetches
    part.on_fetch_reply(FetchReply(0, values.clone(), 1), "s0")
    assert kinds() == ["StepDone"]  # step 1 is not due
    part.on_forward(Forward(1, x, y), "data")
    # step 2 is due: its fetch goes right after step 1's push, before step 2 arrives
    assert kinds() == ["Push", "Fetch", "StepDone"]
    part.on_fetch_reply(FetchReply(0, values.clone(), 2), "s0")
    part.on_forward(Forward(2, x, y), "data")
    assert kinds() == ["StepDone"]  # it runs at once, on what the fetch ahead brought
    assert part.versions == {0: 2}
