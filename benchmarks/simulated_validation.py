"""Does the simulated runtime predict what can be measured? Calibrate on this machine
(``distbelief.bench.calibrate``), then for each case run it for real and on the simulated
runtime with the calibrated cluster, and compare.

    python benchmarks/simulated_validation.py            # the table (minutes)
    python benchmarks/simulated_validation.py --quick    # tiny runs, to see it works
    python benchmarks/simulated_validation.py --json

Cases (MNIST-1D, MLP 40-256-256-10, batch 32, Adagrad at the shards):

- ``processes`` 2 replicas x 1 stage x 1 shard: examples/s and mean staleness;
- ``local`` 4 replicas x 2 stages x 2 shards: examples/s and mean staleness;
- a 2-stage pipelined replica (``pipeline_depth`` 2) on ``processes``, 1 shard;
- Sandblaster (4 replicas, 2 shards, 32 portions, backups) on ``processes`` with replica 3
  slowed 5x (``slow_replicas``: each of its portions takes five times its compute, a sleep
  on processes and virtual time on the simulator): seconds per function evaluation, and the
  slowed replica's share of the portions computed.

Each case is paired, ``--repeats`` times: a calibration (the median of ``--calibrations``),
then at once the real run and the simulated one from the same seed with that calibration's
cluster, so that the machine's drift from minute to minute (its rates moved 15-25% within an
hour here) is in both sides of a pair and not in its ratio. A row gives the medians of the
measured and the predicted figures and of the pairs' ratios (predicted / measured), with the
ratios' range. ``--figures FILE`` predicts every pair from one given calibration instead.
The acceptance aim is each prediction within 25% of the measurement on a quiet machine.

The cluster models a runtime as :func:`distbelief.bench.calibrate.cluster_for` says:
``local`` one machine of one core; ``processes`` one machine of the calibrated cores shared
by the driver's process (the master, Sandblaster's coordinator) and a worker process per core
(``processes``: the actors placed by the processes runtime's own rule, each process one
handler at a time), Downpour's shards shared (a push applied in the sender's process, on
shared memory), every message
between processes costing CPU at both ends.
Take the figures on a quiet machine: a loaded one stretches the real runs' wall time, which
the calibration (in CPU time) does not see.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import distbelief
from distbelief.bench import calibrate
from distbelief.data.datasets import mnist1d
from distbelief.models import mlp
from distbelief.runtime.simulated import layer_flops  # noqa: F401  (documents the FLOP rule)

WIDTHS = [40, 256, 256, 10]


def downpour_case(name, runtime, replicas, stages, shards, depth, epochs, data, figures, place):
    """One Downpour case: (measured, predicted) examples/s and mean staleness."""
    args = dict(
        loss="cross_entropy", lr=0.05, batch_size=32, epochs=epochs, replicas=replicas,
        stages=stages, shards=shards, optimizer="adagrad", seed=0, eval_every=0,
    )  # fmt: skip
    if depth > 1:
        args["pipeline_depth"] = depth
    real_options = {"processes": place["workers"]} if runtime == "processes" else {}
    real = distbelief.train(
        mlp(WIDTHS), data, runtime=runtime, runtime_options=real_options, **args
    )
    cluster = calibrate.cluster_for(runtime, figures)
    if runtime == "processes":
        cluster = cluster | {"processes": place["workers"]}  # as many as the real run's
    sim = distbelief.train(mlp(WIDTHS), data, runtime="simulated", runtime_options=cluster, **args)
    return {
        "case": name,
        "measured": {
            "examples_per_s": real.stats["examples_per_s"],
            "staleness_mean": real.stats["staleness_mean"],
        },
        "predicted": {
            "examples_per_s": sim.stats["virtual_examples_per_s"],
            "staleness_mean": sim.stats["staleness_mean"],
        },
    }


def sandblaster_case(data, figures, steps):
    """Sandblaster with replica 3 of 4 slowed 5x: (measured, predicted) s per evaluation.

    Slowed by ``slow_replicas`` (each of its portions takes five times as long: a sleep of
    four times its measured compute on processes, four times its modelled compute in virtual
    time), not by a planned ``delay``: a delay is added to every message the replica handles,
    a portion's assignment and its verdict alike, which slowed it about 9x, not 5x, and its
    fixed milliseconds do not stretch with the load as the real compute does."""
    args = dict(
        loss="cross_entropy", algorithm="sandblaster", seed=0, steps=steps, history=5,
        replicas=4, shards=2, portions=32,
    )  # fmt: skip
    slow = {"slow_replicas": {3: 5.0}}
    real = distbelief.train(mlp(WIDTHS), data, runtime="processes", runtime_options=slow, **args)
    cluster = calibrate.cluster_for("processes", figures)  # the real run's default workers
    sim = distbelief.train(
        mlp(WIDTHS), data, runtime="simulated", runtime_options=cluster | slow, **args
    )
    return {
        "case": "sandblaster processes, 4 replicas, replica 3 slowed 5x",
        "measured": {
            "s_per_eval": real.stats["train_s"] / real.stats["function_evals"],
            "slow_share": real.stats["portions_computed"][3] / sum(real.stats["portions_computed"]),
        },
        "predicted": {
            "s_per_eval": sim.stats["virtual_s"] / sim.stats["function_evals"],
            "slow_share": sim.stats["portions_computed"][3] / sum(sim.stats["portions_computed"]),
        },
    }


def cases(quick: bool) -> list:
    """Each case, as a function of a calibration's figures: (measured, predicted)."""
    (x, y), _ = mnist1d()
    if quick:
        x, y = x[:1024], y[:1024]
    data = (x, y)
    epochs = 1 if quick else 3

    def workers(figures: dict) -> dict:
        return {"workers": min(2, figures["cores"])}

    return [
        lambda f: downpour_case(
            "processes 2 replicas x 1 stage x 1 shard", "processes", 2, 1, 1, 1, epochs, data,
            f, workers(f),
        ),
        lambda f: downpour_case(
            "local 4 replicas x 2 stages x 2 shards", "local", 4, 2, 2, 1, epochs, data, f, {},
        ),
        lambda f: downpour_case(
            "processes 1 replica x 2 stages, pipeline_depth 2", "processes", 1, 2, 1, 2,
            epochs, data, f, workers(f),
        ),
        lambda f: sandblaster_case(data, f, 2 if quick else 10),
    ]  # fmt: skip


def paired_row(samples: list[dict]) -> dict:
    """One case's row from its paired samples (each a real run and the simulated run from
    the calibration made just before it): the medians of the measured figures, of the
    predicted ones and of the per-pair ratios (predicted / measured), with the ratios' range."""
    row = {"case": samples[0]["case"], "measured": {}, "predicted": {}, "ratio": {}}
    row["ratio_range"] = {}
    for key in samples[0]["measured"]:
        row["measured"][key] = statistics.median(s["measured"][key] for s in samples)
        row["predicted"][key] = statistics.median(s["predicted"][key] for s in samples)
        ratios = [s["predicted"][key] / s["measured"][key] for s in samples if s["measured"][key]]
        row["ratio"][key] = statistics.median(ratios) if ratios else None
        row["ratio_range"][key] = [min(ratios), max(ratios)] if ratios else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--figures", help="a calibration's figures (JSON, as --json prints them): not measured"
    )
    parser.add_argument(
        "--calibrations", type=int, default=1,
        help="before each real run, calibrate this many times and take each figure's median",
    )  # fmt: skip
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    given = None
    if args.figures:
        with open(args.figures) as f:
            given = json.load(f)
        given = given.get("calibration", given)

    def calibration() -> dict:
        """The figures to predict from: the given ones, or measured now (the median of
        ``--calibrations``), so that each real run is paired with a calibration made just
        before it and the machine's drift over minutes does not pass for the model's error."""
        if given is not None:
            return given
        return calibrate.median_figures([
            calibrate.measure(("local", "processes"), quick=args.quick)
            for _ in range(max(1, args.calibrations))
        ])  # fmt: skip

    rows, calibrations = [], []
    for case in cases(args.quick):
        samples = []
        for _ in range(repeats):
            figures = calibration()
            calibrations.append(figures)
            samples.append(case(figures))
        row = paired_row(samples)
        rows.append(row)
        if not args.json:
            for k in row["measured"]:
                ratio, spread = row["ratio"][k], row["ratio_range"][k]
                print(
                    f"{row['case']:55} {k:15} measured {row['measured'][k]:10.4g}"
                    f"  predicted {row['predicted'][k]:10.4g}"
                    f"  ratio {ratio if ratio is None else round(ratio, 2)}"
                    + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
                )
    figures = given if given is not None else calibrate.median_figures(calibrations)
    out = {"calibration": figures, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
