"""Sandblaster promises of the README beyond the core tests: mini-batch L-BFGS (``batch_size``),
``backup_tasks=False``, and a dead replica's pushes told apart by their generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import logistic, mlp
from torch import nn

import distbelief
import distbelief.algorithms.sandblaster.lbfgs as lbfgs_module
from distbelief import SandblasterConfig
from distbelief.algorithms.sandblaster.driver import initial_gradient
from distbelief.algorithms.sandblaster.lbfgs import Settings, minimize, run_op
from distbelief.algorithms.sandblaster.messages import PushGradient
from distbelief.algorithms.sandblaster.portions import batch_indices
from distbelief.core.flat import flatten
from distbelief.runtime.local import LocalRuntime


@pytest.fixture(scope="module")
def convex(mnist1d_data):
    """Multinomial logistic regression data: 600 MNIST-1D examples in float64."""
    (x, y), _ = mnist1d_data
    return x[:600].double(), y[:600]


def batch_grad(x, y, w: torch.Tensor, rows) -> tuple[float, torch.Tensor]:
    """Plain torch: the mean cross-entropy of logistic regression with flat weights ``w``
    (10x40 weight, then 10 biases) on ``rows``, and its gradient."""
    w = w.detach().clone().requires_grad_(True)
    xb, yb = (x, y) if rows is None else (x[rows], y[rows])
    loss = F.cross_entropy(xb @ w[:400].view(10, 40).T + w[400:], yb)
    (g,) = torch.autograd.grad(loss, w)
    return loss.item(), g


# ------------------------------------------------------------------------- mini-batch L-BFGS


def test_mini_batch_lbfgs_pairs_compare_gradients_of_one_batch(convex):
    """With fresh batches, every history pair (s, y) has y = g_B(x + s) - g_B(x) for the one
    batch B of its step (the gradient at x is evaluated again on each new batch), checked on
    the vectors the algorithm leaves, against gradients computed here."""
    x, y = convex
    batches = [torch.randperm(600, generator=torch.Generator().manual_seed(b))[:100]
               for b in range(5)]  # fmt: skip
    calls: list[int] = []

    def closure(w, batch):
        calls.append(batch)
        return batch_grad(x, y, w, batches[batch])

    seen: list[dict[str, torch.Tensor]] = []

    def keep(vs, op):  # the vectors the algorithm works on, to read its history after
        seen[:] = [vs]
        return run_op(vs, op)

    x0 = torch.zeros(410, dtype=torch.float64)
    settings = Settings(steps=4, history=10, fresh_batches=True, max_evals=100, tolerance_grad=0,
                        tolerance_change=0)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lbfgs_module, "run_op", keep)
        final, out = minimize(closure, x0, settings)
    vectors = seen[0]
    assert out.steps == 4 and sorted(set(calls)) == [0, 1, 2, 3]
    pairs = sorted(int(k[1:]) for k in vectors if k[0] == "s" and k[1:].isdigit())
    assert len(pairs) == 4  # one pair per step, none dropped (convex: positive curvature)
    point = x0
    for step, slot in enumerate(pairs):
        s, got = vectors[f"s{slot}"], vectors[f"y{slot}"]
        rows = batches[step]
        want = batch_grad(x, y, point + s, rows)[1] - batch_grad(x, y, point, rows)[1]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        point = point + s
    torch.testing.assert_close(final, point, rtol=0, atol=1e-12)


def test_mini_batch_sandblaster_equals_the_one_process_algorithm_on_those_batches(convex):
    """``batch_size=100``: each step a fresh batch of 100 examples (seeded epochs), the run
    over 2 replicas and 2 shards equals L-BFGS with fresh batches in one process, whose
    closure computes plain torch gradients on exactly those examples."""
    x, y = convex
    result = distbelief.train(
        logistic(), (x, y), loss="cross_entropy", algorithm="sandblaster", steps=4, history=5,
        batch_size=100, replicas=2, shards=2, seed=3,
    )  # fmt: skip
    rows = [batch_indices(600, 100, 3, b) for b in range(4)]
    assert all(len(set(r.tolist())) == 100 for r in rows)  # 100 distinct examples each
    assert len({tuple(sorted(r.tolist())) for r in rows}) == 4  # a fresh batch every step
    settings = Settings(
        steps=4,
        history=5,
        fresh_batches=True,
        max_evals=13,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
    )  # the run's, float64
    want, out = minimize(lambda w, b: batch_grad(x, y, w, rows[b]), torch.zeros(410,
                         dtype=torch.float64), settings)  # fmt: skip
    assert result.stats["steps"] == out.steps == 4
    assert result.stats["function_evals"] == out.function_evals
    torch.testing.assert_close(flatten(result.model.children()), want, rtol=1e-9, atol=1e-12)
    assert result.stats["final_loss"] == pytest.approx(out.loss, rel=1e-9)


# ------------------------------------------------------------------------- backup tasks


@pytest.mark.parametrize("backup", [True, False])
def test_backup_tasks_false_hands_out_no_copy_even_for_a_straggler(mnist1d_data, backup):
    """A replica slowed 4x: with backup tasks its last portions get copies; with
    ``backup_tasks=False`` none, every portion is computed exactly once, and the slow
    replica's portions are all its own results."""
    (x, y), _ = mnist1d_data
    options = {"slow_replicas": {1: 4.0}, **({} if backup else {"backup_tasks": False})}
    result = distbelief.train(
        mlp([40, 16, 10]), (x[:480], y[:480]), loss="cross_entropy", algorithm="sandblaster",
        steps=1, replicas=3, portions=12, seed=0, runtime_options=options,
    )  # fmt: skip
    stats = result.stats
    evals = stats["function_evals"]
    assert sum(stats["portions_done"]) == 12 * evals
    if backup:
        assert stats["backup_portions"] >= 1 and stats["duplicates_dropped"] >= 1
    else:
        assert stats["backup_portions"] == 0 and stats["backup_wins"] == 0
        assert stats["duplicates_dropped"] == 0
        assert list(stats["portions_computed"]) == list(stats["portions_done"])


# ------------------------------------------------------------------------- generations


def test_a_dead_replicas_pushes_of_the_running_evaluation_are_rejected_by_generation():
    """replica1 dies at its 7th portion, after it pushed the sum of its first 4 accepted ones
    to the shards in this very evaluation. Those pushes carry generation 0; the coordinator
    hands its portions out again under generation 1, and the gradient the shards assemble is
    still exactly the full-batch gradient (the old pushes are not counted twice)."""
    pushes: list[PushGradient] = []

    def record(sender, receiver, message):
        if isinstance(message, PushGradient):
            pushes.append(message)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (160,))
    model = mlp([6, 8, 3], act=nn.Tanh, dtype=torch.float64)
    config = SandblasterConfig(
        steps=0, replicas=2, shards=2, portions=16, seed=0,
        runtime_options={"faults": {"replica1": 6}, "tap": record},  # its 7th Assign (from 0)
    )  # fmt: skip
    loss, grad, done = initial_gradient(model, (x, y), F.cross_entropy, config)
    assert done.restarts == 1 and done.reassigned >= 1
    stale = [p for p in pushes if p.replica == 1 and p.generation == 0]
    assert stale and all(p.evaluation == 1 for p in stale)  # it did push in this evaluation
    assert any(p.replica == 1 and p.generation == 1 for p in pushes)  # and again once back
    full = F.cross_entropy(model(x), y)
    expected = torch.cat([t.reshape(-1) for t in torch.autograd.grad(full, model.parameters())])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(full.item(), rel=1e-12)


# ------------------------------------------------------------------------- a runtime passed in


def test_a_runtime_passed_in_runs_sandblaster_with_its_own_options(convex):
    """Sandblaster's own ``runtime_options`` still reach it when the runtime is passed in
    (``eval_steps``: an evaluation per step); the run is the one ``train`` would have made
    with the same seed, and the runtime hosted it and was shut down."""
    x, y = convex
    kw = dict(loss="cross_entropy", algorithm="sandblaster", steps=3, history=5,
              replicas=2, seed=3, eval_data=(x[:100], y[:100]),
              runtime_options={"eval_steps": True})  # fmt: skip
    rt = LocalRuntime(3)
    given = distbelief.train(logistic(), (x, y), runtime=rt, **kw)
    assert given.config.runtime == "local"
    assert rt.delivered > 0 and rt.hosted() == []
    assert len(given.history.eval) == given.stats["steps"] + 1  # each step's, then the final
    by_name = distbelief.train(logistic(), (x, y), **kw)
    assert torch.equal(flatten(given.model.children()), flatten(by_name.model.children()))
