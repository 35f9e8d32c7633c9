"""Hogwild on its own: the baseline of ``distbelief bench --only hogwild``
(``distbelief.bench.baselines.hogwild``: PyTorch's ``mnist_hogwild`` pattern on distbelief's
main job) trained once, with its figures and the test accuracy it reached.

Run: ``python benchmarks/hogwild.py [--workers 2] [--epochs 15] [--json]``
"""

from __future__ import annotations

import argparse
import json

import torch

from distbelief.bench.baselines.hogwild import hogwild
from distbelief.bench.common import MLP
from distbelief.data.inputs import mnist1d
from distbelief.models import mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--samples", type=int, default=10_000, help="MNIST-1D examples (80%% train)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    train, (tx, ty) = mnist1d(args.samples)
    model = mlp(MLP, seed=0)
    figures = hogwild(model, train, workers=args.workers, epochs=args.epochs)
    with torch.no_grad():
        figures["accuracy"] = float((model(tx).argmax(1) == ty).float().mean())
    if args.json:
        print(json.dumps(figures))
    else:
        print(", ".join(f"{k} {v:,.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
