"""Baseline: the asynchronous parameter server of Ray's documentation, on MNIST-1D.

The pattern (Ray docs, "Parameter Server", asynchronous version): one parameter-server actor
holds the whole model and applies gradients with SGD; each worker actor computes a full-model
gradient on one mini-batch of the latest weights it was handed; the driver loop waits for any
gradient, has the server apply it (getting new weights back as a future) and hands those weights
to the worker that finished. Written here from that description.

Run alone: ``python benchmarks/ray_ps_baseline.py`` (starts a local Ray instance).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from torch import nn

from distbelief import models
from distbelief.bench import MLP


def mlp(seed: int = 0) -> nn.Sequential:
    """MLP 40-256-256-10, the benchmark's model (distbelief's main job's)."""
    return models.mlp(MLP, seed=seed)


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _load(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})


@ray.remote(num_cpus=0)
class ParameterServer:
    """The whole model and its SGD optimizer."""

    def __init__(self, lr: float, seed: int) -> None:
        torch.set_num_threads(1)
        self.model = mlp(seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)

    def apply_gradients(self, *gradients: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Sum the given gradients, take one SGD step, return the new weights."""
        summed = [np.sum(layer, axis=0) for layer in zip(*gradients)]
        for p, g in zip(self.model.parameters(), summed):
            p.grad = torch.from_numpy(g)
        self.optimizer.step()
        return _weights(self.model)

    def get_weights(self) -> dict[str, np.ndarray]:
        """The current weights."""
        return _weights(self.model)


@ray.remote(num_cpus=0)
class DataWorker:
    """Computes gradients on its own part of the training data, reshuffled each epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        torch.set_num_threads(1)
        self.model = mlp(seed)
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(x), generator=self.generator)
        self.position = 0

    def compute_gradients(self, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One mini-batch's gradient at ``weights``."""
        _load(self.model, weights)
        if self.position >= len(self.order):
            self.order = torch.randperm(len(self.x), generator=self.generator)
            self.position = 0
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        self.model.zero_grad()
        F.cross_entropy(self.model(self.x[idx]), self.y[idx]).backward()
        return [p.grad.numpy() for p in self.model.parameters()]

    def ready(self) -> bool:
        """Answers once the actor is up."""
        return True


def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Test accuracy."""
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())


def run_baseline(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    workers: int = 2,
    lr: float = 0.2,
    batch_size: int = 32,
    examples: int = 48_000,
    eval_every: int = 2_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The documented asynchronous loop for ``examples`` training examples (Ray must be up).

    Returns examples/s (evaluation time excluded), the evaluation history and the seconds to the
    first evaluation at >= 0.60 test accuracy.
    """
    x, y = train
    bounds = [r * len(x) // workers for r in range(workers + 1)]
    ps = ParameterServer.remote(lr, seed)
    pool = [
        DataWorker.remote(
            x[bounds[r] : bounds[r + 1]], y[bounds[r] : bounds[r + 1]], batch_size, seed + r
        )
        for r in range(workers)
    ]
    ray.get([w.ready.remote() for w in pool] + [ps.get_weights.remote()])
    model = mlp(seed)
    weights = ps.get_weights.remote()
    in_flight = {w.compute_gradients.remote(weights): w for w in pool}
    steps = examples // batch_size
    history: list[dict[str, float]] = []
    eval_s = 0.0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=600)
        if not done:
            raise TimeoutError("baseline: no gradient within 600 s")
        worker = in_flight.pop(done[0])
        weights = ps.apply_gradients.remote(done[0])
        in_flight[worker.compute_gradients.remote(weights)] = worker
        seen = step * batch_size
        if seen % eval_every < batch_size or step == steps:
            t = time.perf_counter()
            wall_s = t - t0 - eval_s  # evaluation pauses this loop: not training time
            _load(model, ray.get(weights, timeout=600))
            history.append({"examples": seen, "wall_s": wall_s, "accuracy": evaluate(model, test)})
            eval_s += time.perf_counter() - t
    train_s = time.perf_counter() - t0 - eval_s
    ray.get(list(in_flight), timeout=600)
    for actor in [ps, *pool]:
        ray.kill(actor)
    return {
        "examples_per_s": steps * batch_size / train_s,
        "train_s": train_s,
        "time_to_060_s": time_to(history, 0.60),
        "final_accuracy": history[-1]["accuracy"],
        "history": history,
    }


def time_to(history: list[dict[str, float]], accuracy: float) -> float | None:
    """Wall seconds of the first evaluation at or above ``accuracy`` (None if never)."""
    return next((h["wall_s"] for h in history if h.get("accuracy", 0) >= accuracy), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--examples", type=int, default=48_000)
    args = parser.parse_args()
    from distbelief.data.inputs import mnist1d
    from distbelief.runtime.ray.runtime import local_ray

    train, test = mnist1d()
    with local_ray():
        result = run_baseline(train, test, workers=args.workers, examples=args.examples)
    result.pop("history")
    print(result)


if __name__ == "__main__":
    main()
