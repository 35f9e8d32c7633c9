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
    "update_flops_per_element": 30.0,
    "handlers": {"message_s": 1e-5, "layer_s": 4e-5, "update_s": 1.5e-4, "jitter": 0.3},
    "cores": 2,
    "busy_speed": 0.9,
    "runtimes": {
        "local": {"message_s": 2e-6, "cpu_s": 3e-6},
        "processes": {"message_s": 1.2e-4, "cpu_s": 8e-5, "bandwidth_Bps": 5e8},
    },
}


def test_the_cluster_file_models_each_runtime_and_reads_back(tmp_path):
    local = calibrate.cluster_for("local", FIGURES)
    assert (local["machines"], local["cores"], local["placement"]) == (1, 1, "pack")
    # the handler fit's terms, on every runtime's cluster
    for options in (local, calibrate.cluster_for("processes", FIGURES)):
        assert (options["message_s"], options["layer_s"], options["update_s"]) == (
            1e-5,
            4e-5,
            1.5e-4,
        )
        assert (options["update_flops_per_element"], options["jitter"]) == (30.0, 0.3)
    assert "shared" not in local and "speeds" not in local
    procs = calibrate.cluster_for("processes", FIGURES)
    # one machine of the cores, shared by the driver's process and a worker per core
    assert (procs["machines"], procs["cores"], procs["speeds"]) == (1, 2, [0.9])
    assert procs["processes"] == 2
    assert procs["shared"] is True  # a push is applied in the sender's process
    # a message between processes: the CPU beyond the in-process one, half at each end; the
    # rest of its seconds, less the in-process ping, is latency
    assert procs["send_s"] == procs["receive_s"] == pytest.approx((8e-5 - 3e-6) / 2)
    assert procs["latency_s"] == pytest.approx(1.2e-4 - 2e-6 - (8e-5 - 3e-6))
    assert procs["bandwidth_Bps"] == 5e8
    old = {k: v for k, v in FIGURES.items() if k != "handlers"} | {"handler_s": 1.5e-4}
    assert calibrate.cluster_for("local", old)["message_s"] == 1.5e-4  # an older file's
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
    assert read_cluster(out)["message_s"] == 1e-5
    code, _, err = run_command(capsys, "calibrate", "--runtime", "guessed")
    assert code == 2 and "runtime" in err


def test_the_handler_fit_and_the_core_figures_run():
    """Plumbing only (their values are timings): the fit's terms are there and not negative."""
    fit = calibrate.handler_costs(1e10, 2.0, 10.0, [4, 8, 3], batch_size=4, steps=4, repeats=1)
    assert set(fit) == {"message_s", "layer_s", "update_s", "jitter", "messages", "message_type_s"}
    by_type = fit.pop("message_type_s")
    assert "Forward" in by_type and all(v >= 0 for v in by_type.values())
    assert all(v >= 0 for v in fit.values()) and fit["jitter"] < 1
    assert calibrate.update_seconds_per_element(sizes=(100, 1000), repeats=1) >= 0
    assert calibrate.marginal_layer_rate([4, 8, 3], batch_size=4, repeats=1) > 0
    assert 0 < calibrate.busy_speed([4, 8, 3], batch_size=4, repeats=1) <= 1


def test_processes_own_handler_fit_bytes_and_pipe_make_its_cluster(tmp_path):
    """A calibration of processes with its own handler fit (shared shards, its run loop), the
    CPU per byte of a message between processes and the pipe's size: its cluster uses them
    (the handlers' spread stays the in-process fit's); local's does not."""
    entry = FIGURES["runtimes"]["processes"] | {
        "byte_cpu_s": 3e-9,
        "pipe_bytes": 65536,
        "handlers": {
            "message_s": 3e-5,
            "layer_s": 6e-5,
            "update_s": 4e-4,
            "messages": 9,
            "message_type_s": {"Forward": 1.2e-5, "Fetch": 1e-6},
            "loop_s": 7e-6,
        },
        "lock_handoff_s": 6e-5,
        "lock_handoff_jitter": 0.5,
        "lock_wake_s": 2e-5,
    }
    figures = FIGURES | {"runtimes": FIGURES["runtimes"] | {"processes": entry}}
    procs = calibrate.cluster_for("processes", figures)
    assert "driver_message_s" not in procs  # not measured in these figures
    with_driver = figures | {
        "runtimes": figures["runtimes"] | {"processes": entry | {"driver_cpu_s": 1e-4}}
    }
    # the driver's process's CPU per message beyond a worker's (8e-5), half at each end
    driver = calibrate.cluster_for("processes", with_driver)["driver_message_s"]
    assert driver == pytest.approx((1e-4 - 8e-5) / 2)
    assert (procs["message_s"], procs["layer_s"], procs["update_s"]) == (3e-5, 6e-5, 4e-4)
    assert procs["jitter"] == 0.3
    assert procs["send_byte_s"] == procs["receive_byte_s"] == pytest.approx(1.5e-9)
    assert procs["pipe_bytes"] == 65536
    # a fixed cost per message type (no lower than a message's own on local, 2e-6), the
    # lock's handoff and the run loop
    assert procs["message_type_s"] == {"Forward": 1.2e-5, "Fetch": 2e-6}
    assert (procs["lock_handoff_s"], procs["lock_handoff_jitter"]) == (6e-5, 0.5)
    assert (procs["lock_wake_s"], procs["loop_s"]) == (2e-5, 7e-6)
    local = calibrate.cluster_for("local", figures)
    assert "lock_handoff_s" not in local and "loop_s" not in local
    assert local["message_s"] == 1e-5 and "send_byte_s" not in local and "pipe_bytes" not in local
    path = tmp_path / "cluster.toml"
    path.write_text(calibrate.to_toml(procs))
    assert read_cluster(path) == procs
    assert calibrate.pipe_buffer_bytes() >= 4096


@pytest.mark.slow
def test_the_processes_handler_fit_runs():
    """Plumbing only (timings): a profiled processes run gives the fit's terms, not negative."""
    fit = calibrate.processes_handler_costs(1e10, 2.0, 10.0, [4, 8, 3], batch_size=4, steps=4)
    assert set(fit) == {"message_s", "layer_s", "update_s", "messages", "message_type_s", "loop_s"}
    assert all(v >= 0 for v in fit.pop("message_type_s").values())
    assert all(v >= 0 for v in fit.values()) and fit["messages"] > 0


def test_the_lock_handoff_is_measured():
    """Plumbing only (timings): a handoff, its spread (at most 0.9) and a release's cost."""
    handoff, spread, wake = calibrate.lock_handoff_seconds(rounds=10, hold_s=1e-4, busy_s=1e-4)
    assert handoff > 0 and 0 <= spread <= 0.9 and wake >= 0


def test_several_calibrations_merge_into_each_figures_median() -> None:
    from distbelief.bench.calibrate import median_figures

    samples = [
        {"core_flops": 6e10, "cores": 2, "runtimes": {"processes": {"send_s": 3e-5}}, "x": "a"},
        {"core_flops": 8e10, "cores": 2, "runtimes": {"processes": {"send_s": 1e-5}}, "x": "b"},
        {"core_flops": 7e10, "cores": 2, "runtimes": {"processes": {"send_s": 2e-5}}, "x": "c"},
    ]
    merged = median_figures(samples)
    assert merged == {"core_flops": 7e10, "cores": 2,
                      "runtimes": {"processes": {"send_s": 2e-5}}, "x": "a"}  # fmt: skip
    assert isinstance(merged["cores"], int)
    assert median_figures(samples[:1]) == samples[0]
    with pytest.raises(ValueError, match="keys differ"):
        median_figures([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="no calibrations"):
        median_figures([])
