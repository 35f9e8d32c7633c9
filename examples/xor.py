"""The seed's XOR example (AkkaDistBelief's README) on distbelief's public API.

A 2-2-1 net with sigmoid activations learns XOR from 50,000 random rows of the truth table:
25 model replicas each train on their own 2,000 rows, one example per step, with plain SGD at
rate 0.5 and squared error. Each layer is a stage with its own parameter-server shard, as
each layer is an actor with its own ParameterShard in the seed.

    python examples/xor.py                 # the seed's numbers
    python examples/xor.py --examples 4000 --data-per-replica 2000
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import distbelief

# Rows of the XOR truth table: inputs A, B and the target (the seed's possibleExamples; its
# leading 1.0 bias unit is nn.Linear's bias here).
POSSIBLE_INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
POSSIBLE_TARGETS = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


def main(
    examples: int = 50_000, data_per_replica: int = 2_000, seed: int = 0, verbose: bool = True
) -> distbelief.TrainResult:
    """Train the seed's XOR net and print its truth table; returns the training result."""
    random = torch.Generator().manual_seed(seed)
    # generate 50000 training examples
    picks = torch.randint(0, len(POSSIBLE_INPUTS), (examples,), generator=random)
    training_set = (POSSIBLE_INPUTS[picks], POSSIBLE_TARGETS[picks])

    # layerDimensions = Seq(2, 2, 1), activation = sigmoid
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1), nn.Sigmoid())

    # create 25 model replicas each training 2000 data points in parallel
    result = distbelief.train(
        model,
        training_set,
        loss="mse",
        lr=0.5,
        batch_size=1,
        epochs=1,
        replicas=examples // data_per_replica,
        stages=2,
        shards=2,
        optimizer="sgd",
        eval_data=(POSSIBLE_INPUTS, POSSIBLE_TARGETS),
        seed=seed,
    )

    if verbose:
        with torch.no_grad():
            outputs = result.model(POSSIBLE_INPUTS)
        print("A B  target  output")
        for (a, b), target, output in zip(POSSIBLE_INPUTS, POSSIBLE_TARGETS, outputs):
            print(f"{a:.0f} {b:.0f}  {target.item():6.0f}  {output.item():6.3f}")
        print(
            f"Finished computing XOR example: {result.stats['examples']:,} examples, "
            f"accuracy {result.history.accuracy:.2f}"
        )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--data-per-replica", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.examples, args.data_per_replica, args.seed)
