"""Sandblaster L-BFGS: the pure maths against torch.optim.LBFGS, the portion book, and runs on
every runtime (convex optimum, exactly once, stragglers, scalars only, a replica killed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from support import RecordingContext, logistic, mlp
from torch import nn

import distbelief
from distbelief import ConfigError, SandblasterConfig
from distbelief.algorithms.messages import Begin
from distbelief.algorithms.sandblaster.coordinator import Coordinator
from distbelief.algorithms.sandblaster.driver import initial_gradient
from distbelief.algorithms.sandblaster.lbfgs import Settings, minimize, run_op
from distbelief.algorithms.sandblaster.messages import (
    Assign,
    ConnectSandblaster,
    Flush,
    Op,
    PortionDone,
    Reduce,
    VectorOps,
    VectorResults,
    Verdict,
)
from distbelief.algorithms.sandblaster.portions import PortionBook, batch_indices, portion_range

# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def convex(mnist1d_data):
    """Multinomial logistic regression on 1,000 MNIST-1D examples, float64, from zero."""
    (x, y), _ = mnist1d_data
    return x[:1000].double(), y[:1000]


def torch_lbfgs(model: nn.Module, x, y, *, steps: int, history: int) -> float:
    """torch.optim.LBFGS with strong Wolfe in one process; the final full-batch loss."""
    params = list(model.parameters())
    opt = torch.optim.LBFGS(
        params, lr=1, max_iter=steps, max_eval=steps * 3, history_size=history,
        tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def sandblaster(model, data, **kw):
    args = dict(loss="cross_entropy", algorithm="sandblaster", seed=0)
    return distbelief.train(model, data, **{**args, **kw})


# ------------------------------------------------------------------------------ pure maths


@pytest.mark.slow
def test_lbfgs_in_one_process_takes_torchs_path(convex):
    """Same two-loop recursion and strong-Wolfe rule: after 25 iterations the loss agrees
    with torch.optim.LBFGS to float64 rounding, and so does the evaluation count."""
    x, y = convex

    def closure(w, batch):
        w = w.detach().requires_grad_()
        loss = F.cross_entropy(x @ w[:400].view(10, 40).T + w[400:], y)
        return loss.item(), torch.autograd.grad(loss, w)[0]

    settings = Settings(steps=25, history=5, max_evals=75, tolerance_grad=1e-10,
                        tolerance_change=1e-14)  # fmt: skip
    _, ours = minimize(closure, torch.zeros(410, dtype=torch.float64), settings)
    model = logistic()
    theirs = torch_lbfgs(model, x, y, steps=25, history=5)
    assert ours.steps == 25
    assert ours.loss == pytest.approx(theirs, rel=1e-9)


def test_vector_ops_never_write_in_place():
    v = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([3.0, 4.0])}
    a, b = v["a"], v["b"]
    assert run_op(v, Op("axpy", "a", "b", alpha=2.0)) is None
    assert run_op(v, Op("mul", "a", "b")) is None
    assert run_op(v, Op("scale", "b", "c", alpha=-1.0)) is None
    assert torch.equal(v["b"], torch.tensor([5.0, 0.0])) and torch.equal(v["c"], -v["b"])
    assert torch.equal(a, torch.tensor([1.0, -2.0])) and torch.equal(b, torch.tensor([3.0, 4.0]))
    assert run_op(v, Op("dot", "a", "b")) == 5.0
    assert run_op(v, Op("absmax", "a")) == 2.0 and run_op(v, Op("abssum", "a")) == 3.0
    run_op(v, Op("copy", "a", "d"))
    run_op(v, Op("drop", "a"))
    assert "a" not in v and v["d"] is a


# ------------------------------------------------------------------------------ portions


def test_portions_go_to_their_own_replica_first_then_are_taken_then_backed_up():
    book = PortionBook(6, 2)
    assert book.next_for(0) == (0, False) and book.next_for(1) == (3, False)
    assert book.complete(0, 0)
    assert book.next_for(0) == (1, False) and book.complete(0, 1)
    assert book.next_for(0) == (2, False) and book.complete(0, 2)
    assert book.next_for(0) == (5, False)  # taken from the end of replica 1's part
    assert book.complete(1, 3) and book.next_for(1) == (4, False)
    assert book.complete(0, 5)
    assert book.next_for(0) == (4, True)  # nothing left: a backup copy of 4
    assert book.complete(0, 4) and not book.complete(1, 4)  # first result wins
    assert book.done and book.backup_wins == 1 and book.backups_handed == 1
    assert book.counted_by(0) == 5 and book.counted_by(1) == 1


def test_a_lost_replicas_portions_are_handed_out_again():
    book = PortionBook(4, 2)
    book.next_for(0), book.complete(0, 0), book.next_for(0)  # 0 counted, 1 in flight
    book.next_for(1), book.complete(1, 2)
    assert sorted(book.lost(0)) == [0, 1]
    assert book.counted_by(0) == 0 and not book.done
    assert book.next_for(1) == (3, False) and book.complete(1, 3)  # its own part first
    assert book.next_for(1) == (1, False)  # then replica 0's part, taken from its end
    assert not book.complete(0, 1)  # a result of the dead incarnation does not count


def test_batches_and_portion_ranges_cover_every_example_once():
    assert batch_indices(10, None, 0, 0) is None
    firsts = torch.cat([batch_indices(10, 5, 3, b) for b in range(2)])
    assert sorted(firsts.tolist()) == list(range(10))
    bounds = [portion_range(10, 3, p) for p in range(3)]
    assert bounds == [(0, 3), (3, 6), (6, 10)]


# ------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_convex_optimum_matches_torch_lbfgs(runtime, convex):
    """Full batch, float64: Sandblaster over 3 replicas and 2 shards ends within 1e-4
    (relative) of torch.optim.LBFGS run to convergence in one process."""
    x, y = convex
    optimum = torch_lbfgs(logistic(), x, y, steps=400, history=10)
    result = sandblaster(
        logistic(), (x, y), steps=150, history=10, replicas=3, shards=2, portions=6,
        runtime=runtime,
    )  # fmt: skip
    assert result.stats["steps"] <= 150 and result.stats["function_evals"] >= result.stats["steps"]
    with torch.no_grad():
        final = float(F.cross_entropy(result.model(x), y))
    assert final == pytest.approx(optimum, rel=1e-4)
    assert result.stats["final_loss"] == pytest.approx(final, rel=1e-12)


def test_exactly_once_with_every_portion_backed_up(runtime):
    """Every portion is handed to two replicas; the gradient the shards assemble is the
    full-batch gradient, and every second copy was dropped."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (90,))
    model = mlp([6, 8, 3], act=nn.Tanh, dtype=torch.float64)
    config = SandblasterConfig(
        steps=0, replicas=3, shards=2, portions=9, seed=0, runtime=runtime,
        runtime_options={"duplicate_portions": True},
    )  # fmt: skip
    loss, grad, done = initial_gradient(model, (x, y), F.cross_entropy, config)
    full = F.cross_entropy(model(x), y)
    expected = torch.cat([t.reshape(-1) for t in torch.autograd.grad(full, model.parameters())])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(full.item(), rel=1e-12)
    assert sum(done.portions_done) == 9
    if runtime == "local":  # one message at a time: every portion handed out twice
        assert (done.backup_portions, done.duplicates_dropped) == (9, 9)
    else:
        # Replicas in parallel: the evaluation ends when every portion has a result, and the
        # copies handed out by then vary (2 to 9 of 9 seen on processes and Ray). At least one
        # was computed and dropped, so the gradient above was checked against a duplicate.
        assert 1 <= done.duplicates_dropped <= done.backup_portions <= 9


def test_a_slow_replica_does_fewer_portions_and_a_backup_finishes_for_it(runtime, mnist1d_data):
    (x, y), _ = mnist1d_data
    options: dict = {"slow_replicas": {2: 5.0}}
    if runtime == "processes":
        # A worker per replica, so the slow one stalls no other; 20 times as slow: a backup
        # of its portion won in 25 of 25 runs (5 times: 38 of 40 with a worker each).
        options = {"slow_replicas": {2: 20.0}, "processes": 3}
    elif runtime == "ray":
        # Each actor a process of its own, but on 2 cores shared with the machine's other
        # work: 5 times as slow let the slow one finish first once under load (no backup won);
        # 20 times, as on processes, lets the run end before its late result comes.
        options = {"slow_replicas": {2: 20.0}}
    result = sandblaster(
        mlp([40, 64, 10]), (x[:2400], y[:2400]), steps=1, replicas=3, portions=24,
        runtime=runtime, runtime_options=options,
    )  # fmt: skip
    done = result.stats["portions_done"]
    assert done[2] < (done[0] + done[1]) / 2  # fewer than the others on average
    assert result.stats["backup_wins"] >= 1  # a backup finished a portion the slow one had
    if runtime == "local":
        # Its late result was dropped. On processes and Ray the run may end before that result
        # comes (0 in 9 of 25 runs on processes), which a process per replica makes possible.
        assert result.stats["duplicates_dropped"] >= 1


def test_every_message_to_or_from_the_coordinator_carries_only_scalars(convex):
    seen: list[object] = []

    def record(sender, receiver, message):
        if "coordinator" in (receiver, sender):
            seen.append(message)

    x, y = convex
    result = sandblaster(
        logistic(), (x, y), steps=5, history=3, replicas=2, shards=2,
        runtime_options={"tap": record},
    )  # fmt: skip

    def tensors(value: object) -> list[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return [value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return [t for f in dataclasses.fields(value) for t in tensors(getattr(value, f.name))]
        if isinstance(value, (tuple, list)):
            return [t for v in value for t in tensors(v)]
        if isinstance(value, dict):
            return [t for v in value.values() for t in tensors(v)]
        return []

    kinds = {type(m).__name__ for m in seen}
    assert {"VectorOps", "VectorResults", "Assign", "PortionDone", "Reduce"} <= kinds
    assert all(t.numel() <= 4 for m in seen for t in tensors(m))
    assert result.stats["coordinator_messages"] == len(seen)


def test_coordinator_traffic_per_step_is_below_one_parameter_copy_and_flat(convex):
    """The README's claim: what the coordinator sends and receives per L-BFGS step is less
    than one copy of the parameters and does not grow with the parameter count."""
    x, y = convex
    per_step = {}
    for hidden in (8, 256):  # 418 and 13,066 parameters
        model = mlp([40, hidden, 10], act=nn.Tanh, dtype=torch.float64)
        stats = sandblaster(model, (x, y), steps=4, history=3, replicas=2, shards=2).stats
        assert stats["steps"] == 4
        per_step[hidden] = stats["coordinator_bytes"] / stats["steps"]
    assert per_step[256] < 13_066 * 8  # 12,319 bytes a step against 104,528
    assert per_step[256] == pytest.approx(per_step[8], rel=0.1)  # flat (equal here)


def test_options_of_the_other_algorithm_are_refused():
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    model = mlp([4, 2])
    for option in ("lr", "epochs", "optimizer", "n_fetch", "n_push", "warmstart_steps",
                   "local_lr"):  # fmt: skip
        with pytest.raises(ConfigError, match=f"^{option}: a Downpour option"):
            sandblaster(model, (x, y), **{option: 1})
    for option in ("steps", "history", "portions"):
        with pytest.raises(ConfigError, match=f"^{option}: a Sandblaster option"):
            distbelief.train(model, (x, y), loss="cross_entropy", lr=0.1, batch_size=4,
                             epochs=1, **{option: 2})  # fmt: skip
    with pytest.raises(ConfigError, match="^lr: Downpour needs it"):
        distbelief.train(model, (x, y), loss="cross_entropy", batch_size=4, epochs=1)
    with pytest.raises(ConfigError, match="^history: must be an integer >= 1"):
        sandblaster(model, (x, y), history=-1)
    with pytest.raises(ConfigError, match="^portions: 2 portions for 3 replicas"):
        sandblaster(model, (x, y), replicas=3, portions=2)
    with pytest.raises(ConfigError, match="^algorithm: unknown algorithm 'adam'"):
        sandblaster(model, (x, y), algorithm="adam")


def test_a_replica_killed_mid_batch_changes_nothing(runtime, convex):
    """replica1 is killed at its 20th portion (mid-evaluation; on Ray its process, on processes
    the replica alone, rebuilt in its worker): its
    portions are handed to the others, the restarted replica joins again, and the run ends
    where the in-process run without a failure ends. Without backup copies the evaluation
    cannot end before the run has seen the death: the killed replica's portion is only done
    once the runtime has restarted it and the coordinator has handed that portion out again."""
    x, y = convex
    args = dict(steps=30, history=5, replicas=3, shards=2, portions=9)
    faults = {"replica1": 20}
    plain = sandblaster(logistic(), (x, y), **args)
    killed = sandblaster(
        logistic(), (x, y), runtime=runtime,
        runtime_options={"faults": faults, "backup_tasks": False}, **args,
    )  # fmt: skip
    stats = killed.stats
    assert stats["restarts"] == 1 and stats["restarts_by_actor"] == {"replica1": 1}
    assert stats["reassigned"] >= 1 and stats["backup_portions"] == 0
    if runtime == "ray":  # a new process
        assert len(stats["pids"]["replica1"]) == 2
    assert stats["steps"] == plain.stats["steps"] == 30
    # Rounding differs (portions are summed in other groups): seen 7e-16 (loss, relative) and
    # 4e-14 (weights) after 30 steps.
    assert stats["final_loss"] == pytest.approx(plain.stats["final_loss"], rel=1e-9)
    torch.testing.assert_close(killed.model[0].weight, plain.model[0].weight, rtol=1e-6, atol=1e-9)


def test_the_coordinator_steps_one_decision_per_message():
    c = Coordinator(Settings(steps=1), replicas=2, portions=4, batch_examples=40)
    ctx = RecordingContext("coordinator")
    c.bind(ctx)
    c.receive(ConnectSandblaster(("s0", "s1"), ("r0", "r1"), "coordinator"), "driver")
    c.receive(Begin(), "driver")
    sent = ctx.take()  # the first program (x -> w) goes to both shards
    assert [ref for ref, _ in sent] == ["s0", "s1"] and isinstance(sent[0][1], VectorOps)
    c.receive(VectorResults(0, c.tag, ()), "s0")
    assert ctx.take() == []  # waits for every shard
    c.receive(VectorResults(1, c.tag, ()), "s1")
    sent = ctx.take()  # an evaluation: each replica gets the first portion of its own part
    assert sent == [("r0", Assign(1, 0, 0, 0, 0)), ("r1", Assign(1, 0, 2, 0, 0))]

    def done(replica, portion):
        c.receive(PortionDone(replica, 0, 1, portion, 1.0, 10), f"r{replica}")
        return ctx.take()

    assert done(0, 0) == [("r0", Verdict(1, 0, True)), ("r0", Assign(1, 0, 1, 0, 1))]
    assert done(1, 2) == [("r1", Verdict(1, 2, True)), ("r1", Assign(1, 0, 3, 0, 1))]
    assert done(0, 1) == [("r0", Verdict(1, 1, True)), ("r0", Assign(1, 0, 3, 0, 2))]  # backup
    sent = done(1, 3)  # the original wins; every portion counted: flush and reduce
    assert sent[0] == ("r1", Verdict(1, 3, True))
    assert [m for _, m in sent[1:3]] == [Flush(1), Flush(1)]
    assert [m for _, m in sent[3:]] == [Reduce(1, 1, ((0, 0, 2), (1, 0, 2)), 40)] * 2
    assert done(0, 3) == [("r0", Verdict(1, 3, False))]  # the backup's result is dropped
    assert (c.backup_portions, c.duplicates_dropped, c.portions_done) == (1, 1, [2, 2])


def test_a_late_result_of_an_earlier_evaluation_does_not_assign_a_busy_replica_twice():
    """Replica 1 is slow: a backup wins its portion of evaluation 1, evaluation 2 hands it a
    portion, then its result for evaluation 1 comes in. It is still computing the first
    assignment of evaluation 2; a second one would replace it, and the sum the shards wait
    for would never come (a deadlock seen on processes)."""
    from distbelief.algorithms.sandblaster.messages import Reduced
    from distbelief.algorithms.sandblaster.shard import SandblasterShard

    # Two real shards minimising 0.5 |w - 1|^2; the coordinator steps one message at a time.
    shards = [SandblasterShard(k, torch.zeros(3, dtype=torch.float64)) for k in range(2)]
    shard_ctx = [RecordingContext("coordinator") for _ in shards]
    for shard, ctx in zip(shards, shard_ctx):
        shard.bind(ctx)
    c = Coordinator(Settings(steps=3), replicas=2, portions=4, batch_examples=40)
    ctx = RecordingContext("coordinator")
    c.bind(ctx)
    c.receive(ConnectSandblaster(("s0", "s1"), ("r0", "r1"), "coordinator"), "driver")
    c.receive(Begin(), "driver")

    def loss_sum() -> float:  # of a portion of 10 examples at the point "w"
        w = torch.cat([s.vectors["w"] for s in shards])
        return float(0.5 * ((w - 1) ** 2).sum()) * 10

    def run_until_assigned(sent: list) -> list[tuple[str, Assign]]:
        """Let the shards answer what the coordinator sends until portions go out."""
        while not any(isinstance(m, Assign) for _, m in sent):
            for ref, m in sent:
                if not ref.startswith("s"):
                    continue  # verdicts and flushes to the replicas
                k = int(ref[1:])
                if isinstance(m, Reduce):  # the gradient the replicas' pushes would sum to
                    shards[k].vectors["gw"] = shards[k].vectors["w"] - 1
                    c.receive(Reduced(k, m.evaluation, m.round), ref)
                else:
                    shards[k].receive(m, "coordinator")
                    for _, reply in shard_ctx[k].take():
                        c.receive(reply, ref)
            sent = ctx.take()
        return [(ref, m) for ref, m in sent if isinstance(m, Assign)]

    def done(replica: int, evaluation: int, portion: int) -> list[tuple[object, object]]:
        c.receive(PortionDone(replica, 0, evaluation, portion, loss_sum(), 10), f"r{replica}")
        return ctx.take()

    first = run_until_assigned(ctx.take())
    assert [(r, m.evaluation, m.portion) for r, m in first] == [("r0", 1, 0), ("r1", 1, 2)]
    done(0, 1, 0), done(0, 1, 1), done(0, 1, 3)  # replica 0 takes 3 from replica 1's part
    sent = done(0, 1, 2)  # then a backup copy of 2, which wins: evaluation 1 is complete
    second = run_until_assigned(sent)
    assert [(r, m.evaluation) for r, m in second] == [("r0", 2), ("r1", 2)]
    late = done(1, 1, 2)  # replica 1's result for evaluation 1, while it computes the next
    assert late == [("r1", Verdict(1, 2, False))]  # dropped, and no second assignment
    assert c.backup_wins == 1 and c.duplicates_dropped == 1


def test_a_shard_refuses_more_pushed_portions_than_were_accepted_even_once_complete():
    """A replica's pushes already covering its accepted portions, while the Reduce waits for
    another replica's: one more push of it is an error, not a larger sum."""
    from distbelief.algorithms.sandblaster.messages import PushGradient, Reduce
    from distbelief.algorithms.sandblaster.shard import SandblasterShard

    shard = SandblasterShard(0, torch.zeros(3, dtype=torch.float64))
    shard.bind(RecordingContext("coordinator"))
    one = torch.ones(3, dtype=torch.float64)
    shard.receive(Reduce(1, 1, ((0, 0, 2), (1, 0, 2)), 40), "coordinator")
    shard.receive(PushGradient(1, 0, 0, 2, one), "r0")  # replica 0's two: complete
    with pytest.raises(RuntimeError, match="replica 0 pushed 3 portions, 2 were accepted"):
        shard.receive(PushGradient(1, 0, 0, 1, one), "r0")
