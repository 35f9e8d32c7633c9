"""distbelief calibrate: the cluster file it writes is one the simulated runtime reads, and
models each runtime as bench/calibrate.py says; the measurements themselves are timed, so
only their plumbing is run here (tiny sizes), never their values asserted."""

from __future__ import annotations

import json

import pytest
import torch
from support import run as run_command

from distbelief import ConfigError
from distbelief.bench import calibrate
from distbelief.runtime.simulated import read_cluster

FIGURES = {
    "core_flops": 2e10,
    "flops_per_element": 2.0,
    "handler_s": 1.5e-4,
    "cores": 2,
    "runtimes": {
        "local": {"message_s": 2e-6},
        "processes": {"message_s": 1.2e-4, "bandwidth_Bps": 5e8},
    },
}


def test_the_cluster_file_models_each_runtime_and_reads_back(tmp_path):
    local = calibrate.cluster_for("local", FIGURES)
    assert (local["machines"], local["cores"], local["placement"]) == (1, 1, "pack")
    assert local["message_s"] == 1.5e-4  # the handlers' cost, above the bare queue's
    procs = calibrate.cluster_for("processes", FIGURES)
    assert (procs["machines"], procs["cores"]) == (2, 1)
    assert procs["latency_s"] == pytest.approx(1.2e-4 - 2e-6)
    assert procs["bandwidth_Bps"] == 5e8
    for options in (local, procs):
        path = tmp_path / "cluster.toml"
        path.write_text(calibrate.to_toml(options, "measured\nhere"))
        assert read_cluster(path) == options
    with pytest.raises(ConfigError, match="ray"):
        calibrate.cluster_for("ray", FIGURES)
    with pytest.raises(ConfigError, match="runtime"):
        calibrate.measure(("guessed",))


def test_the_flop_rate_counts_what_the_simulator_counts():
    """Its FLOPs are the simulator's: three matrix products per linear layer and example
    (forward, and the weights' and the input's gradients; the first layer's input needs none)."""
    from distbelief.models import mlp
    from distbelief.runtime.simulated import LayerFlops

    model, x = mlp([4, 8, 3]), torch.randn(5, 4)
    counter = LayerFlops()
    with counter:
        torch.autograd.grad(model(x).sum(), list(model.parameters()))
    assert counter.take() == 2 * 5 * (4 * 8 * 2 + 8 * 3 * 3)
    assert calibrate.layer_rate([4, 8, 3], batch_size=5, repeats=1) > 0


def test_the_command_writes_a_cluster_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "measure", lambda runtimes, **kw: FIGURES)
    out = tmp_path / "c.toml"
    code, stdout, _ = run_command(
        capsys, "calibrate", "--runtime", "local", "--out", str(out), "--json"
    )
    assert code == 0
    assert json.loads(stdout.strip().splitlines()[-1])["cluster"]["machines"] == 1
    assert read_cluster(out)["message_s"] == 1.5e-4
    code, _, err = run_command(capsys, "calibrate", "--runtime", "guessed")
    assert code == 2 and "runtime" in err
