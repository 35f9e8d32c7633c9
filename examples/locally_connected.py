"""MNIST-1D with a locally-connected net, each stage's layers split into 2 partitions.

The paper's image models are locally connected: a convolution's windows with weights of their
own at every position (``distbelief.nn.LocallyConnected1d``). Such a net splits well across
machines, the paper's Figure 1: a block of output positions needs only a thin halo of its
neighbours' inputs. The net is ``distbelief.models.mnist1d_local`` (78,010 parameters, about
the main job's MLP); 4 replicas x 2 stages, each stage cut into 2 blocks (``partitions=2``),
push to 2 parameter-server shards running Adagrad.

    python examples/locally_connected.py                   # 2 partitions per stage
    python examples/locally_connected.py --partitions 1    # the same net unsplit
    python examples/locally_connected.py --train-size 4000 --epochs 4
    distbelief train --model distbelief.models:mnist1d_local --lr 0.02   # unsplit, CLI
"""

from __future__ import annotations

import argparse

import torch

import distbelief
from distbelief.data import mnist1d
from distbelief.models import mnist1d_local


def main(
    partitions: int = 2,
    train_size: int | None = None,
    epochs: int = 15,
    seed: int = 0,
    verbose: bool = True,
) -> distbelief.TrainResult:
    """Train the locally-connected net on MNIST-1D (the first ``train_size`` examples) with
    each stage cut into ``partitions`` blocks, and report test accuracy."""
    (x, y), test = mnist1d()
    if train_size is not None:
        x, y = x[:train_size], y[:train_size]
    result = distbelief.train(
        mnist1d_local(seed=seed),
        (x, y),
        loss="cross_entropy",
        lr=0.02,
        batch_size=32,
        epochs=epochs,
        replicas=4,
        stages=2,
        shards=2,
        optimizer="adagrad",
        eval_data=test,
        seed=seed,
        partitions=partitions,
    )
    if verbose:
        s = result.stats
        how = f"{partitions} partitions" if partitions > 1 else "unsplit"
        print(
            f"{how}: test accuracy {result.history.accuracy:.3f}, {s['examples']:,} examples "
            f"at {s['examples_per_s']:,.0f}/s, staleness mean {s['staleness_mean']:.2f}"
        )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small matmuls: intra-op threads cost more than they give
    main(args.partitions, args.train_size, args.epochs, args.seed)
