"""MNIST-1D with a small 1-D convolutional net, split into three stages, trained by Downpour.

The model is any ``nn.Sequential``: here convolutions, not an MLP. ``stages=[3, 7]`` gives
explicit split points: stage 0 is the first convolution, stage 1 the two strided ones, stage 2
the classifier. 4 replicas push to 2 parameter-server shards running Adagrad.

    python examples/mnist1d_cnn.py                     # ~0.85-0.90 test accuracy, seconds
    python examples/mnist1d_cnn.py --train-size 4000 --epochs 4
    distbelief train --model examples/mnist1d_cnn.py:make_model --stages 3   # the same, CLI
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import distbelief
from distbelief.data import mnist1d


def make_model(channels: int = 32, in_features: int = 40, out_features: int = 10) -> nn.Sequential:
    """A 1-D CNN for signals of length ``in_features`` (MNIST-1D's 40) and ``out_features``
    classes (10). ``distbelief train --model`` passes both, read from the data."""
    length = (in_features + 3) // 4  # after two stride-2 convolutions: ceil(ceil(n/2)/2)
    return nn.Sequential(
        nn.Unflatten(1, (1, in_features)),  # (N, 40) -> (N, 1, 40): one input channel
        nn.Conv1d(1, channels, 5, padding=2), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, padding=1, stride=2), nn.ReLU(),  # length 20
        nn.Conv1d(channels, channels, 3, padding=1, stride=2), nn.ReLU(),  # length 10
        nn.Flatten(), nn.Linear(channels * length, out_features),
    )  # fmt: skip


def main(
    train_size: int | None = None, epochs: int = 10, seed: int = 0, verbose: bool = True
) -> distbelief.TrainResult:
    """Train the CNN on MNIST-1D (the first ``train_size`` examples) and report test accuracy."""
    (x, y), test = mnist1d()
    if train_size is not None:
        x, y = x[:train_size], y[:train_size]
    torch.manual_seed(seed)
    result = distbelief.train(
        make_model(),
        (x, y),
        loss="cross_entropy",
        lr=0.02,
        batch_size=32,
        epochs=epochs,
        replicas=4,
        stages=[3, 7],
        shards=2,
        optimizer="adagrad",
        eval_data=test,
        seed=seed,
    )
    if verbose:
        s = result.stats
        print(
            f"test accuracy {result.history.accuracy:.3f}, {s['examples']:,} examples at "
            f"{s['examples_per_s']:,.0f}/s, staleness mean {s['staleness_mean']:.2f}"
        )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny convolutions: intra-op threads cost more than they give
    main(args.train_size, args.epochs, args.seed)
