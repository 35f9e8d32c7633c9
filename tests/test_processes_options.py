"""The processes runtime's options and promises (README, *Running on one multi-core machine*):
``processes=N`` places replica groups on N workers, ``threads_per_process`` sets each worker's
torch threads, workers ignore SIGINT, and a message lost between workers ends the run with
``Deadlock`` rather than a hang."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from support import mlp

import distbelief
from distbelief.errors import Deadlock
from distbelief.runtime import Actor, receives
from distbelief.runtime.processes import ProcessesRuntime

pytestmark = pytest.mark.processes  # the whole module runs the processes runtime


class Ask:
    pass


class Where(Actor):
    """Answers where and how it runs: its pid, torch's threads, whether SIGINT is ignored."""

    @receives(Ask)
    def on_ask(self, msg: Ask, sender: object) -> None:
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        self.ctx.tell(sender, (self.ctx.name, os.getpid(), torch.get_num_threads(), ignored))


def ask(rt: ProcessesRuntime, refs: list) -> dict[str, tuple[int, int, bool]]:
    out = {}
    for ref in refs:
        name, pid, threads, ignored = next(iter(rt.converse(ref, Ask(), timeout=60)))
        out[name] = (pid, threads, ignored)
    return out


def test_processes_threads_per_process_and_sigint_in_the_workers():
    """Groups 0-3 on ``processes=3`` (whatever the machine's cores): group g in worker
    g % 3 + 1, so 0 and 3 share one; each worker runs torch with ``threads_per_process=3``
    threads and ignores SIGINT: sent one, it still answers."""
    rt = ProcessesRuntime(seed=0, processes=3, threads_per_process=3)
    try:
        refs = [rt.spawn(f"probe{g}", Where) for g in range(4)]
        seen = ask(rt, refs)
        pids = {name: pid for name, (pid, _, _) in seen.items()}
        workers = rt.describe()["worker_pids"]
        assert len(workers) == 3 and os.getpid() not in pids.values()
        assert [pids[f"probe{g}"] for g in range(4)] == [*workers, workers[0]]
        assert all(threads == 3 and ignored for _, threads, ignored in seen.values())
        for pid in workers:
            os.kill(pid, signal.SIGINT)  # a Ctrl-C to the workers' process group, say
        assert {name: pid for name, (pid, _, _) in ask(rt, refs).items()} == pids
    finally:
        rt.shutdown()


@pytest.mark.parametrize("cpus, workers", [(2, 2), (8, 3)])
def test_by_default_one_worker_per_replica_at_most_one_per_core(monkeypatch, cpus, workers):
    """3 replicas: 2 workers on 2 cores (replica 2 shares replica 0's), 3 on 8."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    result = distbelief.train(
        mlp([4, 4, 2]), (x, (x[:, 0] > 0).long()), loss="cross_entropy", lr=0.1, batch_size=16,
        epochs=1, replicas=3, seed=0, runtime="processes",
    )  # fmt: skip
    assert len(result.stats["worker_pids"]) == workers
    homes = result.stats["processes"]
    assert [homes[f"data{r}"] for r in range(3)] == [1, 2, 1 if workers == 2 else 3]
    assert all(homes[f"replica{r}.stage0"] == homes[f"data{r}"] for r in range(3))
    assert homes["master"] == 0 and homes["shard0"] == "shared"


class Rally(Actor):
    """Passes a number back and forth with ``peer`` until it reaches ``last``, then tells
    the driver."""

    def __init__(self, last: int) -> None:
        self.last, self.peer, self.driver = last, None, None

    @receives(tuple)
    def on_start(self, msg: tuple, sender: object) -> None:
        self.peer, self.driver = msg[0], sender
        if msg[1]:
            self.ctx.tell(self.peer, 0)

    @receives(int)
    def on_number(self, n: int, sender: object) -> None:
        if n == self.last:
            self.ctx.tell(self.driver, "done")
        else:
            self.ctx.tell(self.peer, n + 1)


def test_a_message_lost_between_workers_is_detected_as_a_deadlock():
    """Two actors in two workers rally a number; the receiving worker loses number 40 after
    taking it off the pipe. Nobody has anything left to do and the driver has no reply: the
    run ends with ``Deadlock`` (well before its timeout), not a hang."""

    def lossy(sender, receiver, message):
        return message != 40  # it arrived from the other worker: lost before its mailbox

    rt = ProcessesRuntime(seed=0, processes=2, tap=lossy)  # the workers inherit the tap
    try:
        a, b = rt.spawn("rally0", Rally, 100), rt.spawn("rally1", Rally, 100)
        rt.tell(b, (a, False))
        with pytest.raises(Deadlock, match="no actor in any process"):
            next(iter(rt.converse(a, (b, True), timeout=30)))
    finally:
        rt.shutdown()
