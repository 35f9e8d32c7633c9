"""Ctrl-C (README, *Python API*): the first stops the run and keeps what was trained; a second
one while that is being collected gives up on it."""

from __future__ import annotations

import signal

import pytest
import torch
from support import mlp

import distbelief
from distbelief.algorithms.downpour.driver import INTERRUPTED
from distbelief.algorithms.downpour.parameter_shard import ParameterShard


def toy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    return x, (x[:, 0] > 0).long()


@pytest.mark.parametrize("runtime", ["local", "processes"])
def test_a_second_ctrl_c_while_the_trained_model_is_collected_gives_up_on_it(monkeypatch, runtime):
    """The first Ctrl-C comes at the third progress report; the second while a shard answers
    the driver's request for the parameters trained so far (in the driver's process on both
    runtimes). The run ends with a plain KeyboardInterrupt, no model, and the handler of
    SIGINT is the one from before the run."""
    collect = ParameterShard.on_snapshot

    def on_snapshot(self, msg, sender):
        if msg.tag == INTERRUPTED:
            signal.raise_signal(signal.SIGINT)  # the second Ctrl-C
        collect(self, msg, sender)

    monkeypatch.setattr(ParameterShard, "on_snapshot", on_snapshot)
    reports = []

    def progress(report) -> None:
        reports.append(report)
        if len(reports) == 3:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as info:
        distbelief.train(
            mlp([10, 16, 3]), toy(), loss="cross_entropy", lr=0.1, batch_size=8, epochs=50,
            replicas=2, shards=2, progress=progress, runtime=runtime,
            runtime_options={"processes": 2} if runtime == "processes" else {},
        )  # fmt: skip
    assert not isinstance(info.value, distbelief.TrainingInterrupted)  # it gave up
    assert len(reports) == 3
    assert signal.getsignal(signal.SIGINT) is before
