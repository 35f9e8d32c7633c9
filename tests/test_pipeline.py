"""Several mini-batches in flight per Downpour replica (``pipeline_depth``, issue 22): weight
stashing against a plain-torch reference of PipeDream's asynchronous pipeline, each push's
version, the data shard's counting and positions, a stage killed with mini-batches in flight,
a checkpoint resumed, Ctrl-C, the refusals, and runs on the other runtimes."""

from __future__ import annotations

import copy
import signal
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from support import RecordingContext, mlp, run, run_json, separable_data, toy_data
from torch import nn

import distbelief
from distbelief import ConfigError
from distbelief.algorithms.downpour.config import MAX_PIPELINE_DEPTH
from distbelief.algorithms.downpour.data_shard import DataShard
from distbelief.algorithms.downpour.driver import build_layout
from distbelief.algorithms.downpour.messages import (
    Backward,
    CheckpointRequest,
    ConnectDataShard,
    ConnectStage,
    DataPosition,
    Fetch,
    FetchReply,
    Forward,
    Push,
    StartReplica,
    StepDone,
)
from distbelief.algorithms.downpour.stage import Stage
from distbelief.core.flat import flatten
from distbelief.data.inputs import TensorRows
from distbelief.data.sharding import replica_batches
from distbelief.runtime.base import ActorRestarted
from distbelief.storage import checkpoint

KW = dict(loss="cross_entropy", lr=0.1, batch_size=16, optimizer="sgd", seed=0)


# ------------------------------------------------------------------ the oracle


def reference(model, split, data, events, *, lr, batch_size, epochs, n_push, seed=0):
    """Weight-stashed asynchronous pipelining in plain torch, replaying the run's order of
    events: the shard's mailbox (fetches answered and pushes applied, in the order it handled
    them) and, per stage, which fetch each forward used (the last one it sent before sending
    that forward's output). Each step's gradient is the plain gradient of the composed model
    at the values its forwards used in each stage. Returns the final flat parameters and the
    version every push should quote (per stage, in order)."""
    x, y = data
    batches = replica_batches(x, y, replica=0, seed=seed, batch_size=batch_size, epochs=epochs)
    layers = list(model.children())
    stage_layers = [layers[:split], layers[split:]]
    values = [[p.detach().clone() for p in nn.Sequential(*g).parameters()] for g in stage_layers]
    versions = [0, 0]
    snapshots: list[list] = [[], []]  # per stage: (values, version) of each fetch answered
    fetch_of: list[dict[int, int]] = [{}, {}]  # per stage: step -> index of the fetch it used
    sent_fetches = [0, 0]
    shard_log = []
    for sender, receiver, message in events:
        if receiver == "shard0" and isinstance(message, (Fetch, Push)):
            shard_log.append(message)
        for s in (0, 1):
            if sender != f"replica0.stage{s}":
                continue
            if isinstance(message, Fetch):
                sent_fetches[s] += 1
            elif isinstance(message, (Forward, Backward)):  # this stage's forward of the step
                fetch_of[s][message.step] = sent_fetches[s] - 1

    grads: dict[int, list] = {}

    def gradient(step: int) -> list:
        """Per stage, the gradients of step ``step`` at the values its forwards used."""
        if step not in grads:
            used = [snapshots[s][fetch_of[s][step]][0] for s in (0, 1)]
            stages = [copy.deepcopy(nn.Sequential(*g)) for g in stage_layers]
            for stage, vals in zip(stages, used):
                with torch.no_grad():
                    for p, v in zip(stage.parameters(), vals):
                        p.copy_(v)
            bx, by = batches[step]
            F.cross_entropy(stages[1](stages[0](bx)), by).backward()
            grads[step] = [[p.grad for p in stage.parameters()] for stage in stages]
        return grads[step]

    pushes = [0, 0]
    quoted: list[list[int]] = [[], []]
    steps = len(batches)
    for message in shard_log:
        s = message.stage
        if isinstance(message, Fetch):
            snapshots[s].append(([v.clone() for v in values[s]], versions[s]))
            continue
        covered = range(pushes[s] * n_push, min((pushes[s] + 1) * n_push, steps))
        pushes[s] += 1
        quoted[s].append(snapshots[s][fetch_of[s][covered[0]]][1])  # the oldest forward's
        total = [sum(gradient(k)[s][i] for k in covered) for i in range(len(values[s]))]
        values[s] = [v - lr * g for v, g in zip(values[s], total)]
        versions[s] += 1
    flat = torch.cat([v.reshape(-1) for vals in values for v in vals])
    return flat, quoted


def run_tapped(model, data, **kw):
    """``train`` on the local runtime with every message recorded: (result, events)."""
    events = []
    result = distbelief.train(
        model, data, runtime_options={"tap": lambda *event: events.append(event)}, **kw
    )
    return result, events


def stashing_mattered(events) -> bool:
    """Whether some backward pass of stage 0 came when the stage's current values were of
    another version than its forward used (else backward at the current values would pass)."""
    replies, used, current = [], {}, None
    fetches = 0
    for sender, receiver, message in events:
        if sender == "replica0.stage0" and isinstance(message, Fetch):
            fetches += 1
        elif sender == "replica0.stage0" and isinstance(message, Forward):
            used[message.step] = fetches - 1
        elif receiver == "replica0.stage0" and isinstance(message, FetchReply):
            replies.append(message.version)
            current = message.version
        elif receiver == "replica0.stage0" and isinstance(message, Backward):
            if current != replies[used[message.step]]:
                return True
    return False


# The seeds whose interleaving lands a fetch of new values between some forward of stage 0 and
# its backward (with one replica many do not: see stashing_mattered).
@pytest.mark.parametrize(
    "depth, n_fetch, n_push, seed", [(2, 1, 1, 9), (4, 1, 2, 4), (4, 2, 1, 0), (4, 2, 2, 0)]
)
def test_a_pipelined_replica_equals_weight_stashed_asynchronous_pipelining(
    depth, n_fetch, n_push, seed
):
    """One replica, two stages, one shard, SGD, float64: the parameters after 24 steps equal
    the plain-torch reference replaying the run's order of events, and every push quotes the
    version its oldest forward used. (Backward passes at the current instead of the stashed
    values miss it by up to 8e-4.)"""
    model = mlp([10, 16, 16, 3], dtype=torch.float64)
    data = toy_data(128)
    data = (data[0].double(), data[1])
    kw = dict(KW, seed=seed, epochs=3, stages=[2], shards=1, pipeline_depth=depth,
              n_fetch=n_fetch, n_push=n_push)  # fmt: skip
    result, events = run_tapped(model, data, **kw)
    assert stashing_mattered(events)
    expected, quoted = reference(model, 2, data, events, lr=0.1, batch_size=16, epochs=3,
                                 n_push=n_push, seed=seed)  # fmt: skip
    torch.testing.assert_close(flatten(result.model.children()), expected, rtol=0, atol=1e-6)
    pushed = defaultdict(list)
    for _, _, message in events:
        if isinstance(message, Push):
            pushed[message.stage].append(message.fetched_version)
    assert [pushed[0], pushed[1]] == quoted
    assert result.stats["staleness_max"] >= 1  # pipelining's own staleness, one replica
    assert result.stats["steps"] == 3 * 128 // 16


# ------------------------------------------------------------------ a stage, stepped by hand


def middle_stage(n_push: int = 1, depth: int = 2) -> tuple[Stage, RecordingContext, nn.Module]:
    """Stage 1 of 3 (a previous and a next stage), one shard: Linear(4, 5) then Tanh."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), nn.Tanh()]
    layout = build_layout([[nn.Linear(3, 4)], layers, [nn.Linear(5, 2)]], 1)
    stage = Stage(0, 1, copy.deepcopy(layers), layout.segments_of_stage(1),
                  layout.stage_ranges[1][0], None, 1, n_push, pipeline_depth=depth)  # fmt: skip
    ctx = RecordingContext("replica0.stage1")
    stage.bind(ctx)
    stage.on_connect(ConnectStage("prev", "next", ("shard0",), "data0"), None)
    return stage, ctx, nn.Sequential(*layers)


def grads_at(module: nn.Module, values: torch.Tensor, x: torch.Tensor, g: torch.Tensor):
    """Plain torch: the parameters' and the input's gradients at ``values``."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        offset = 0
        for p in module.parameters():
            p.copy_(values[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    x = x.clone().requires_grad_()
    module(x).backward(g)
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()]), x.grad


def test_each_backward_uses_the_values_its_forward_used_even_if_the_lent_ones_change():
    """Two forwards on two versions, then their backward passes: each pushes the gradient at
    its own version and sends back the input's gradient at it, although the shard refreshed
    the first version's lent tensor in place meanwhile (as a shared-memory shard does)."""
    stage, ctx, module = middle_stage()
    n = sum(p.numel() for p in module.parameters())
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 4, generator=g) for _ in range(2)]
    gs = [torch.randn(3, 5, generator=g) for _ in range(2)]
    lent = torch.randn(n, generator=g)
    v0, v1 = lent.clone(), torch.randn(n, generator=g)
    stage.on_forward(Forward(0, xs[0], torch.zeros(3)), "prev")
    assert [type(m) for _, m in ctx.take()] == [Fetch]
    stage.on_fetch_reply(FetchReply(0, lent, 7), "shard0")
    stage.on_forward(Forward(1, xs[1], torch.zeros(3)), "prev")  # n_fetch = 1: fetches first
    assert [type(m) for _, m in ctx.take()] == [Forward, Fetch]
    lent.copy_(v1)  # the shard refreshes its lent copy in place: the stash must not see it
    stage.on_fetch_reply(FetchReply(0, v1.clone(), 9), "shard0")
    ctx.take()
    for step, version, values in ((0, 7, v0), (1, 9, v1)):
        stage.on_backward(Backward(step, gs[step], 0.5), "next")
        push, back = (m for _, m in ctx.take())
        expected, x_grad = grads_at(module, values, xs[step], gs[step])
        assert isinstance(push, Push) and push.fetched_version == version
        torch.testing.assert_close(torch.cat(push.grads), expected)
        assert isinstance(back, Backward) and back.step == step
        torch.testing.assert_close(back.grad, x_grad)
    assert stage.waiting == {}  # nothing stashed is kept after its backward


def test_a_push_of_several_steps_quotes_the_oldest_version_and_stays_lent_while_fetching():
    stage, ctx, module = middle_stage(n_push=2)
    n = sum(p.numel() for p in module.parameters())
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(3, 4, generator=g), torch.randn(3, 5, generator=g)
    stage.on_forward(Forward(0, x, torch.zeros(3)), "prev")
    stage.on_fetch_reply(FetchReply(0, torch.randn(n, generator=g), 3), "shard0")
    stage.on_forward(Forward(1, x, torch.zeros(3)), "prev")
    stage.on_fetch_reply(FetchReply(0, torch.randn(n, generator=g), 5), "shard0")
    stage.on_backward(Backward(0, grad, 0.5), "next")
    stage.on_forward(Forward(2, x, torch.zeros(3)), "prev")  # its fetch is on its way...
    ctx.take()
    stage.on_backward(Backward(1, grad, 0.5), "next")
    (push,) = [m for _, m in ctx.take() if isinstance(m, Push)]
    assert push.fetched_version == 3  # the older of versions 3 and 5
    assert not push.done_reading  # ...so the shard must not write into what it lends


def test_a_redo_after_a_restart_replaces_what_waits_from_its_step_on():
    stage, ctx, module = middle_stage()
    n = sum(p.numel() for p in module.parameters())
    x, t = torch.randn(3, 4), torch.zeros(3)
    stage.on_forward(Forward(0, x, t), "prev")
    stage.on_fetch_reply(FetchReply(0, torch.randn(n), 1), "shard0")  # step 0 waits
    stage.on_forward(Forward(1, x, t), "prev")  # waits for its fetch
    stage.on_forward(Forward(0, x, t), "prev")  # the data shard redoes steps 0 and 1
    stage.on_forward(Forward(1, x, t), "prev")
    ctx.take()
    stage.on_fetch_reply(FetchReply(0, torch.randn(n), 2), "shard0")
    assert [m.step for _, m in ctx.take() if isinstance(m, Forward)] == [0, 1]  # once each
    assert sorted(stage.waiting) == [0, 1]


# ------------------------------------------------------------------ the data shard, by hand


def data_shard(depth: int, n_push: int = 1) -> tuple[DataShard, RecordingContext]:
    x, y = toy_data(64)
    shard = DataShard(0, TensorRows(x, y), 8, 2, 0, 50, n_push=n_push, pipeline_depth=depth)
    ctx = RecordingContext("data0")
    shard.bind(ctx)
    shard.on_connect(ConnectDataShard(("stage0", "stage1"), "master"), None)
    return shard, ctx


def steps_sent(ctx: RecordingContext) -> list[int]:
    return [m.step for _, m in ctx.take() if isinstance(m, Forward)]


def test_the_data_shard_keeps_depth_mini_batches_in_flight_across_epochs_and_finishes_last():
    shard, ctx = data_shard(depth=3)
    shard.on_start(StartReplica(), "master")
    assert steps_sent(ctx) == [0, 1, 2]
    for step in range(16):  # 2 epochs of 8
        shard.on_step_done(StepDone(step, 1.0), "stage0")
        sent = ctx.take()
        forwards = [m.step for _, m in sent if isinstance(m, Forward)]
        assert forwards == ([step + 3] if step + 3 < 16 else [])
        finished = [m for _, m in sent if type(m).__name__ == "Finish"]
        assert bool(finished) == (step == 15)  # only once the last in flight is done
    assert shard.steps == 16 and shard.examples == 128


def test_a_position_is_never_past_a_step_not_yet_done_and_rounds_to_n_push():
    shard, ctx = data_shard(depth=4, n_push=2)
    shard.on_start(StartReplica(), "master")
    for step in (0, 1, 3):  # out of order, as after a restart: step 2 is not done
        shard.on_step_done(StepDone(step, 1.0), "stage0")
    ctx.take()
    shard.on_checkpoint_request(CheckpointRequest(1), "master")
    (position,) = [m for _, m in ctx.take() if isinstance(m, DataPosition)]
    assert (position.steps, position.step) == (2, 2)  # 3 done, 2 in a row, a multiple of 2
    shard.on_step_done(StepDone(3, 1.0), "stage0")  # reported twice: counted once
    assert shard.steps == 3


def test_a_restarted_stage_gets_every_mini_batch_in_flight_again_in_order():
    shard, ctx = data_shard(depth=3)
    shard.on_start(StartReplica(), "master")
    shard.on_step_done(StepDone(0, 1.0), "stage0")
    ctx.take()
    shard.on_actor_restarted(ActorRestarted("stage1", "stage1"), "master")
    assert steps_sent(ctx) == [1, 2, 3]
    for step in (1, 2, 1, 3, 2):  # the redone steps reported again are counted once
        shard.on_step_done(StepDone(step, 1.0), "stage0")
    assert shard.steps == 4


# ------------------------------------------------------------------ whole runs


def test_a_stage_killed_with_two_mini_batches_in_flight_is_survived_each_redone_once():
    model = mlp([10, 16, 16, 3])
    events = []

    def tap(sender, receiver, message):
        events.append((sender, receiver, message))

    result = distbelief.train(
        model, toy_data(), epochs=2, stages=2, pipeline_depth=2, **KW,
        runtime_options={"faults": ["kill:replica0.stage1@step=5"], "tap": tap},
    )  # fmt: skip
    assert result.stats["restarts_by_actor"] == {"replica0.stage1": 1}
    assert result.stats["steps"] == 2 * 256 // 16  # every step counted once
    assert result.stats["examples"] == 2 * 256
    sent, done, redone = [], set(), []
    restart = next(i for i, (_, r, m) in enumerate(events)
                   if r == "data0" and isinstance(m, ActorRestarted))  # fmt: skip
    for i, (sender, receiver, message) in enumerate(events):
        if sender == "data0" and isinstance(message, Forward):
            (redone if message.step in sent else sent).append(message.step)
        elif receiver == "data0" and isinstance(message, StepDone) and i < restart:
            done.add(message.step)
    in_flight = [step for step in sent[: max(sent.index(s) for s in redone) + 1]
                 if step not in done]  # fmt: skip
    assert redone == in_flight and len(redone) == 2  # each in flight, once, in order
    assert torch.isfinite(flatten(result.model.children())).all()


def test_a_checkpoint_taken_with_two_in_flight_resumes(tmp_path):
    """A run stopped after its first periodic checkpoint, resumed from it: the steps after
    the checkpoint's positions are taken, and only those."""
    kw = dict(KW, optimizer="adagrad", lr=0.05, stages=2, shards=2, replicas=2,
              pipeline_depth=2, epochs=2)  # fmt: skip

    def progress(report) -> None:
        if checkpoint.checkpoints(tmp_path):
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(distbelief.TrainingInterrupted):
        distbelief.train(mlp([10, 16, 2]), separable_data(), checkpoint_dir=tmp_path,
                         checkpoint_every=8, progress=progress, **kw)  # fmt: skip
    ckpt = checkpoint.load(tmp_path)
    resumed = distbelief.train(mlp([10, 16, 2]), separable_data(), resume=tmp_path,
                               checkpoint_dir=tmp_path / "resumed", **kw)  # fmt: skip
    done = sum(int(p["examples"]) for p in ckpt.positions.values())
    assert 0 < done < 2 * 512
    assert resumed.stats["resumed_from_update"] == ckpt.update
    assert resumed.stats["examples"] == 2 * 512 - done
    assert resumed.history.final_loss < 0.5


def test_buffers_and_evaluations_with_two_in_flight():
    # The forwards run on stashed parameters but the module's own buffers (BatchNorm's
    # statistics), which the evaluations during training and the result take from replica 0.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    data = separable_data()
    result = distbelief.train(model, data, eval_data=data, eval_every=256, epochs=2,
                              stages=[2], pipeline_depth=2, **dict(KW, optimizer="adagrad",
                              lr=0.05))  # fmt: skip
    assert len(result.history.eval) >= 4 and result.history.eval[-1]["accuracy"] > 0.9
    assert not torch.equal(result.model[1].running_mean, model[1].running_mean)


def test_ctrl_c_with_two_in_flight_keeps_what_was_trained():
    model = mlp([10, 16, 8, 3])
    reports = []

    def progress(report) -> None:
        reports.append(report)
        if len(reports) == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(distbelief.TrainingInterrupted) as info:
        distbelief.train(model, toy_data(), epochs=50, replicas=2, stages=2, shards=2,
                         pipeline_depth=2, progress=progress, **KW)  # fmt: skip
    trained = flatten(info.value.model.children())
    assert torch.isfinite(trained).all()
    assert not torch.equal(trained, flatten(model.children()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "runtime, kind",
    [
        pytest.param("processes", "exit", marks=pytest.mark.processes),  # its worker crashes
        pytest.param("ray", "kill", marks=pytest.mark.ray),
    ],
)
def test_a_stage_killed_with_two_in_flight_is_survived_in_a_new_process(request, runtime, kind):
    """Ray and processes have no tap to watch the redone steps by in the test's process (the
    test above does, in process): here each step is counted once, the stage runs in a new
    process, and the run trains. (On processes the two stages are in two workers; the second
    stage's worker crashes and a new one, forked by the fork server, takes its place.)"""
    if runtime == "ray":
        request.getfixturevalue("ray_session")
    model = mlp([10, 16, 16, 3])
    x, y = toy_data()
    result = distbelief.train(
        model, (x, y), epochs=2, stages=2, pipeline_depth=2, eval_data=(x, y), runtime=runtime,
        runtime_options={"faults": [f"{kind}:replica0.stage1@step=5"]}, **KW,
    )  # fmt: skip
    assert result.stats["restarts_by_actor"] == {"replica0.stage1": 1}
    assert result.stats["steps"] == 2 * 256 // 16  # every step counted once
    assert result.stats["examples"] == 2 * 256
    if runtime == "ray":
        first, second = result.stats["pids"]["replica0.stage1"]
        assert first != second
    else:  # worker 2 hosted the stage alone: replaced
        assert result.stats["processes"]["replica0.stage1"] == 2
        assert len(set(result.stats["worker_pids"])) == 3
    trained = flatten(result.model.children())
    assert torch.isfinite(trained).all() and not torch.equal(trained, flatten(model.children()))
    with torch.no_grad():
        untrained = torch.nn.functional.cross_entropy(model(x), y).item()
    assert result.history.eval[-1]["loss"] < untrained


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["processes", pytest.param("ray", marks=pytest.mark.ray)])
def test_two_in_flight_trains_on_the_other_runtimes(request, runtime):
    if runtime == "ray":
        request.getfixturevalue("ray_session")
    x, y = separable_data(1024)
    result = distbelief.train(
        mlp([10, 32, 32, 2]), (x[:768], y[:768]), eval_data=(x[768:], y[768:]), epochs=2,
        replicas=2, stages=2, shards=2, pipeline_depth=2, runtime=runtime,
        **dict(KW, optimizer="adagrad", lr=0.05),
    )  # fmt: skip
    assert result.stats["examples"] == 2 * 768
    assert result.history.eval[-1]["accuracy"] > 0.9


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(pipeline_depth=0), r"^pipeline_depth: must be an integer >= 1, got 0"),
        (dict(pipeline_depth=2.0), r"^pipeline_depth: must be an integer >= 1, got 2.0"),
        (dict(pipeline_depth="2"), r"^pipeline_depth: must be an integer >= 1, got '2'"),
        (dict(pipeline_depth=True), r"^pipeline_depth: must be an integer >= 1, got True"),
        (dict(pipeline_depth=MAX_PIPELINE_DEPTH + 1, stages=2),
         rf"^pipeline_depth: at most {MAX_PIPELINE_DEPTH} mini-batches in flight, got 17"),
        (dict(pipeline_depth=2), r"^pipeline_depth: 2 mini-batches .* need stages > 1.*stages"),
        (dict(pipeline_depth=2, algorithm="sandblaster", steps=2, lr=None, epochs=None),
         r"^pipeline_depth: a Downpour option; sandblaster does not take it"),
    ],
)  # fmt: skip
def test_a_bad_pipeline_depth_is_refused_naming_it(overrides, match):
    kw = {**dict(loss="cross_entropy", lr=0.1, batch_size=8, epochs=1), **overrides}
    with pytest.raises(ConfigError, match=match):
        distbelief.train(mlp([10, 8, 3]), toy_data(32), **kw)


def test_the_command_takes_pipeline_depth_and_refuses_a_bad_one(capsys):
    out = run_json(capsys, "train", "digits", "--epochs", "1", "--pipeline-depth", "2",
                   "--no-run-dir")  # fmt: skip
    assert out["pipeline_depth"] == 2 and out["examples"] > 0
    code, _, err = run(capsys, "train", "digits", "--pipeline-depth", "0", "--no-run-dir")
    assert code == 2 and err.startswith("distbelief: error: pipeline_depth")
