"""Downpour engine against oracles: plain torch loops over the same mini-batches."""

from __future__ import annotations

import copy
import signal

import pytest
import torch
import torch.nn.functional as F
from support import RUNTIMES, mlp
from torch import nn

import distbelief
from distbelief.core.flat import flatten
from distbelief.data.inputs import replica_batches, replica_ranges
from distbelief.runtime import LocalRuntime


def toy_data(n: int = 256, features: int = 10, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def plain_loop(model, batches, make_opt, loss_fn=F.cross_entropy, accumulate: int = 1):
    """The oracle: a plain torch.optim loop; steps with the sum of `accumulate` gradients."""
    model = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    for i, (x, y) in enumerate(batches):
        loss_fn(model(x), y).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return flatten(model.children())


def run(model, data, **kw):
    kw.setdefault("loss", "cross_entropy")
    kw.setdefault("lr", 0.1)
    kw.setdefault("batch_size", 16)
    kw.setdefault("epochs", 2)
    kw.setdefault("seed", 7)
    return distbelief.train(model, data, **kw)


def final(result):
    return flatten(result.model.children())


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.1),
}


# Every update rule on the runtimes of one machine; on Ray (the same shard code behind a
# transport, and seconds a run) the one with state of its own, Adagrad.
@pytest.mark.parametrize(
    "runtime, optimizer",
    [(rt, opt) for rt in RUNTIMES for opt in OPTIMIZERS if rt != "ray" or opt == "adagrad"],
    indirect=["runtime"],
)
def test_single_replica_equals_plain_torch_optim_loop(runtime, optimizer):
    make_opt = OPTIMIZERS[optimizer]
    model = mlp([10, 16, 16, 3])
    x, y = toy_data()
    result = run(model, (x, y), optimizer=optimizer, runtime=runtime)
    batches = replica_batches(x, y, replica=0, seed=7, batch_size=16, epochs=2)
    expected = plain_loop(model, batches, make_opt)
    assert not torch.equal(expected, flatten(model.children())), "the oracle must move"
    torch.testing.assert_close(final(result), expected, rtol=1e-6, atol=1e-6)
    assert result.stats["staleness_max"] == 0
    assert result.stats["updates_applied"] == [2 * 256 // 16]


SPLITS = [(3, 1), (1, 4), (3, 4), ([1, 4], 2)]


# Every split on the runtimes of one machine; on Ray (a transport, not a different split, and
# seconds a run) the one with most stages and shards.
@pytest.mark.parametrize(
    "runtime, stages, shards",
    [(rt, st, sh) for rt in RUNTIMES for st, sh in SPLITS if rt != "ray" or (st, sh) == (3, 4)],
    indirect=["runtime"],
)
def test_stages_and_shards_do_not_change_a_single_replica_run(runtime, stages, shards):
    model = mlp([10, 16, 16, 3])
    x, y = toy_data()
    # The unsplit run in process: every runtime's equals it (the test above).
    base = final(run(model, (x, y), optimizer="adagrad"))
    split = run(model, (x, y), optimizer="adagrad", stages=stages, shards=shards, runtime=runtime)
    torch.testing.assert_close(final(split), base, rtol=1e-6, atol=1e-6)
    assert len(split.stats["updates_applied"]) == shards


def test_n_fetch_n_push_4_equals_summed_gradients_every_4_steps(runtime):
    model = mlp([10, 16, 16, 3])
    x, y = toy_data()  # 256 / 16 = 16 steps per epoch: a multiple of 4
    result = run(model, (x, y), n_fetch=4, n_push=4, stages=2, runtime=runtime)
    batches = replica_batches(x, y, replica=0, seed=7, batch_size=16, epochs=2)
    expected = plain_loop(model, batches, lambda p: torch.optim.SGD(p, lr=0.1), accumulate=4)
    torch.testing.assert_close(final(result), expected, rtol=1e-6, atol=1e-6)
    assert result.stats["updates_applied"] == [2 * 2 * 16 // 4]  # two stages push


def test_leftover_gradient_is_pushed_at_the_end():
    model = mlp([10, 16, 3])
    x, y = toy_data(n=80)  # 5 steps; n_push = 4 leaves one step accrued
    result = run(model, (x, y), epochs=1, n_fetch=4, n_push=4)
    batches = replica_batches(x, y, replica=0, seed=7, batch_size=16, epochs=1)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for i, (bx, by) in enumerate(batches):
        F.cross_entropy(m(bx), by).backward()
        if (i + 1) % 4 == 0 or i == len(batches) - 1:
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(final(result), flatten(m.children()), rtol=1e-6, atol=1e-6)


def test_warmstart_longer_than_replica_0_is_sequential_training():
    """Replica 0 alone for all of its steps, then replica 1: a plain loop over both in turn."""
    model = mlp([10, 16, 3])
    x, y = toy_data(n=128)
    result = run(model, (x, y), replicas=2, epochs=1, warmstart_steps=10**6)
    (a0, b0), (a1, b1) = replica_ranges(128, 2)
    batches = replica_batches(x[a0:b0], y[a0:b0], replica=0, seed=7, batch_size=16, epochs=1)
    batches += replica_batches(x[a1:b1], y[a1:b1], replica=1, seed=7, batch_size=16, epochs=1)
    expected = plain_loop(model, batches, lambda p: torch.optim.SGD(p, lr=0.1))
    torch.testing.assert_close(final(result), expected, rtol=1e-6, atol=1e-6)


def test_after_a_warmstart_every_replica_runs_asynchronously():
    model = mlp([10, 16, 3])
    x, y = toy_data(n=256)
    solo = run(model, (x, y), replicas=4, epochs=1, warmstart_steps=3, seed=1)
    # The order (replica 0 alone, then the rest) is checked step by step in test_master.py and
    # by the sequential oracle above; here: once unleashed, all replicas run and see staleness.
    assert solo.stats["steps"] == 4 * 4
    assert solo.stats["staleness_max"] > 0


def test_local_step_between_fetches_matches_its_definition():
    model = mlp([10, 16, 3])
    x, y = toy_data(n=64)
    result = run(model, (x, y), epochs=1, n_fetch=4, n_push=4, local_lr=0.05, lr=0.1)
    batches = replica_batches(x, y, replica=0, seed=7, batch_size=16, epochs=1)
    # Oracle: the client copy takes w -= 0.05*g each step; the server takes w -= 0.1*sum(g).
    client = copy.deepcopy(model)
    server = flatten(model.children())
    accrued = torch.zeros_like(server)
    for bx, by in batches:
        client.zero_grad()
        F.cross_entropy(client(bx), by).backward()
        g = torch.cat([p.grad.reshape(-1) for p in client.parameters()])
        accrued += g
        with torch.no_grad():
            for p in client.parameters():
                p -= 0.05 * p.grad
    server = server - 0.1 * accrued
    torch.testing.assert_close(final(result), server, rtol=1e-5, atol=1e-6)


def test_float64_model_trains_in_float64(runtime):
    model = mlp([10, 16, 3], dtype=torch.float64)
    x, y = toy_data()
    result = run(model, (x, y), runtime=runtime, stages=2, shards=3)
    assert all(p.dtype == torch.float64 for p in result.model.parameters())
    batches = replica_batches(x.double(), y, replica=0, seed=7, batch_size=16, epochs=2)
    expected = plain_loop(model, batches, lambda p: torch.optim.SGD(p, lr=0.1))
    torch.testing.assert_close(final(result), expected, rtol=1e-12, atol=1e-12)


def test_dataset_input_equals_tensor_input():
    model = mlp([10, 16, 3])
    x, y = toy_data(n=64)
    a = run(model, (x, y))
    b = run(model, torch.utils.data.TensorDataset(x, y))
    assert torch.equal(final(a), final(b))


def test_input_model_is_not_modified():
    model = mlp([10, 16, 3])
    before = flatten(model.children()).clone()
    run(model, toy_data(n=64), stages=2, shards=2, replicas=2)
    assert torch.equal(flatten(model.children()), before)


def test_same_seed_is_bit_identical_and_another_seed_differs():
    model = mlp([10, 32, 32, 3])
    x, y = toy_data(n=512)
    kw = dict(replicas=4, stages=2, shards=2, optimizer="adagrad", epochs=1)
    a = final(run(model, (x, y), seed=11, **kw))
    b = final(run(model, (x, y), seed=11, **kw))
    c = final(run(model, (x, y), seed=12, **kw))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_asynchronous_replicas_see_stale_parameters():
    model = mlp([10, 32, 3])
    x, y = toy_data(n=512)
    result = run(model, (x, y), replicas=4, shards=2, epochs=1, seed=3)
    stats = result.stats
    assert stats["updates_applied_total"] == 4 * (128 // 16) * 2  # 2 shards, 1 stage
    assert 0 < stats["staleness_mean"] <= stats["staleness_max"] <= 3 * 8


def two_replica_data(n: int):
    """``n`` examples for two replicas whose halves differ: replica 1's inputs are shifted by
    +5, so its BatchNorm statistics are far from replica 0's."""
    x, y = toy_data(n=n)
    x[n // 2 :] += 5.0
    return x, y


def bn_model(tail: list[nn.Module]) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> ``tail``, the Linear frozen: the BatchNorm's input, and
    so its running statistics, depend only on the mini-batches it saw, not on training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), *tail)
    model[0].requires_grad_(False)
    return model


def replica_0_statistics(model, x, y, *, steps: int | None = None, epochs: int = 1):
    """The oracle: a copy of ``model``'s first two layers after replica 0's first ``steps``
    mini-batches (all of them by default) in training mode; its BatchNorm layer."""
    probe = copy.deepcopy(model[:2]).train()
    (a, b), _ = replica_ranges(len(x), 2)
    batches = replica_batches(x[a:b], y[a:b], replica=0, seed=7, batch_size=16, epochs=epochs)
    with torch.no_grad():
        for xb, _ in batches[:steps]:
            probe(xb)
    return probe[1]


def test_batchnorm_buffers_come_from_replica_0():
    model = bn_model([nn.Linear(16, 3)])
    x, y = two_replica_data(128)
    result = run(model, (x, y), replicas=2, stages=2)
    bn, oracle = result.model[1], replica_0_statistics(model, x, y, epochs=2)
    assert bn.num_batches_tracked.item() == oracle.num_batches_tracked.item() == 64 // 16 * 2
    torch.testing.assert_close(bn.running_mean, oracle.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, oracle.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adagrad", "adam"])
def test_frozen_parameters_stay_exactly_as_they_were(optimizer):
    # Fine-tuning: a parameter with requires_grad False is fetched and used, never changed.
    model = mlp([10, 16, 8, 3])
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)  # a whole frozen layer, in the second stage
    result = run(model, toy_data(), optimizer=optimizer, replicas=2, stages=2, shards=3)
    trained = result.model
    assert torch.equal(trained[0].weight, model[0].weight)
    assert torch.equal(trained[2].weight, model[2].weight)
    assert torch.equal(trained[2].bias, model[2].bias)
    assert not torch.equal(trained[0].bias, model[0].bias)
    assert not torch.equal(trained[4].weight, model[4].weight)
    assert not trained[0].weight.requires_grad and trained[0].bias.requires_grad


def test_evaluations_during_training_use_replica_0s_current_buffers(runtime):
    # The parameters never change, so an evaluation depends only on the BatchNorm statistics
    # replica 0 has accumulated by then. All are frozen but the last layer's, whose gradient is
    # exactly zero: in training it sees the zeros of Dropout(p=1) (in evaluation, its input).
    # Two replicas on different data (replica 1's shifted): replica 1's statistics give other
    # evaluations.
    model = bn_model([nn.Linear(16, 3), nn.Dropout(1.0), nn.Linear(3, 3, bias=False)])
    for layer in model[:4]:
        layer.requires_grad_(False)
    (x, y), (ex, ey) = two_replica_data(256), toy_data(n=64, seed=1)
    result = run(model, (x, y), eval_data=(ex, ey), epochs=1, eval_every=192, stages=2,
                 replicas=2, runtime=runtime)  # fmt: skip
    during = result.history.eval[0]["loss"]

    def evaluate(steps: int) -> float:
        """The evaluation after replica 0's first ``steps`` steps (0: initial statistics)."""
        probe = copy.deepcopy(model)
        probe[1] = replica_0_statistics(model, x, y, steps=steps)
        with torch.no_grad():
            return F.cross_entropy(probe.eval()(ex), ey).item()

    after = [evaluate(k) for k in range(128 // 16 + 1)]
    # Asked for after 192 of the 256 examples: replica 0 has taken at least 4 of its 8 steps
    # (the request may reach the stage a few steps later).
    assert any(during == pytest.approx(a, rel=1e-6) for a in after[4:]), (during, after)
    assert during != pytest.approx(after[0], rel=1e-6)


def test_ctrl_c_stops_training_and_keeps_what_was_trained(runtime):
    model = mlp([10, 16, 8, 3])
    reports = []
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background

    def progress(report) -> None:  # the driver's thread, as a user's Ctrl-C would be
        reports.append(report)
        if len(reports) == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(distbelief.TrainingInterrupted) as info:
        run(model, toy_data(), epochs=50, replicas=2, stages=2, shards=2, progress=progress,
            runtime=runtime)  # fmt: skip
    assert isinstance(info.value, KeyboardInterrupt)  # uncaught, it ends a script as Ctrl-C
    # It stopped at the interrupt (after 960 of 12,800 examples), not some time later...
    assert reports[-1].examples <= 50 * 256 // 10
    trained = flatten(info.value.model.children())
    assert torch.isfinite(trained).all()
    assert not torch.equal(trained, flatten(model.children()))  # ...and kept what it trained
    assert signal.getsignal(signal.SIGINT) is handler  # the run gave Ctrl-C back as it was


@pytest.mark.slow
def test_mnist1d_four_replicas_two_stages_two_shards_adagrad(runtime, mnist1d_data):
    train, test = mnist1d_data
    torch.manual_seed(0)
    model = mlp([40, 256, 256, 10])
    result = distbelief.train(
        model,
        train,
        loss="cross_entropy",
        lr=0.05,
        batch_size=32,
        epochs=5,
        replicas=4,
        stages=2,
        shards=2,
        optimizer="adagrad",
        eval_data=test,
        seed=0,
        runtime=runtime,
    )
    assert result.history.accuracy >= 0.60
    assert result.stats["rejected_pushes"] == 0
    assert result.stats["examples"] == 5 * len(train[0])


@pytest.mark.slow
def test_xor_seed_setting_learns_xor():
    """The seed's example at a fifth of its data: 10,000 examples, 25 replicas x 400, 2-2-1
    sigmoid, lr 0.5 (it still learns the table: outputs 0.03, 0.97, 0.97, 0.04)."""
    from distbelief.data.inputs import xor

    train, table = xor(10_000, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1), nn.Sigmoid())
    result = distbelief.train(
        model,
        train,
        loss="mse",
        lr=0.5,
        batch_size=1,
        epochs=1,
        replicas=25,
        stages=2,
        optimizer="sgd",
        eval_data=table,
        seed=0,
    )
    out = result.model(table[0]).detach()
    assert ((out > 0.5) == (table[1] > 0.5)).all(), out
    assert result.history.accuracy == 1.0


def test_final_evaluation_is_of_the_returned_model_with_its_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = toy_data(n=256)
    x = x * 5 + 3  # far from BatchNorm's initial statistics (mean 0, var 1)
    result = run(model, (x, y), replicas=2, eval_data=(x, y))
    with torch.no_grad():
        out = result.model.eval()(x)
    expected = float((out.argmax(1) == y).float().mean())
    assert result.history.accuracy == pytest.approx(expected)
    assert result.history.eval[-1]["loss"] == pytest.approx(float(F.cross_entropy(out, y)))


def test_a_runtime_passed_in_hosts_the_run_and_is_recorded_by_its_name(tmp_path):
    # The seam for tests (a runtime they made, to watch or to tap): the run is the one
    # train() would have made with the same seed, and run directories record the name.
    data = toy_data()
    rt = LocalRuntime(7)
    given = run(mlp([10, 8, 3]), data, replicas=2, runtime=rt, run_dir=tmp_path / "run")
    assert given.config.runtime == "local"
    assert 'runtime = "local"' in (tmp_path / "run" / "config.toml").read_text()
    assert rt.delivered > 0 and rt.hosted() == []  # it hosted the run, and was shut down
    by_name = run(mlp([10, 8, 3]), data, replicas=2, run_dir=tmp_path / "by_name")
    assert torch.equal(final(given), final(by_name))
