"""Server-side update rules: what a PS shard does with a pushed gradient. Built on torch.optim.

Each segment a shard holds (its overlap with one stage) has its own optimizer over the
segment's pieces (one flat ``nn.Parameter`` per piece: see ``layout``), so a push touches only
its segment and no other segment's optimizer state. Every rule here is elementwise, so how a
segment is cut into pieces changes no number.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError

Params = list[nn.Parameter]
# Each builder maps (parameters, lr) to a torch optimizer. Defaults follow the paper/torch.
# foreach=False, torch's own default on the CPU: a segment has a few pieces, and grouping them
# only adds overhead.
UPDATE_RULES: dict[str, Callable[[Params, float], torch.optim.Optimizer]] = {
    # w <- w - lr * g, exactly (torch's SGD without momentum does precisely this).
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, foreach=False),
    "momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, foreach=False),
    # The paper's Adagrad: eta_i = gamma / sqrt(sum_j g_ij^2), per parameter, shard-local;
    # torch adds eps=1e-10 to the denominator so a zero gradient history cannot divide by 0.
    "adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr, foreach=False),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr, foreach=False),
}


def make_update_rule(name: str, params: Params, lr: float) -> torch.optim.Optimizer:
    """The torch optimizer implementing update rule ``name`` over a segment's pieces."""
    try:
        builder = UPDATE_RULES[name]
    except KeyError:
        raise ConfigError(
            f"optimizer: unknown optimizer {name!r}; choose one of {', '.join(UPDATE_RULES)}"
        ) from None
    return builder(params, lr)


def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create now every per-parameter state the update rule would create at its first step,
    with the values it would give it, so that no later step differs: a runtime can then move
    all of the state into shared memory before its processes start. (Adagrad creates its
    state eagerly; momentum's buffer, created as a copy of the first gradient, equals a zero
    buffer after ``buf * momentum + g``; Adam's moments start at zero.)"""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if isinstance(optimizer, torch.optim.Adam):
                double = torch.get_default_dtype() == torch.float64  # torch's own rule
                scalar = torch.float64 if double else torch.float32
                state["step"] = torch.tensor(0.0, dtype=scalar)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
            elif isinstance(optimizer, torch.optim.SGD) and group["momentum"] != 0:
                if group["dampening"] != 0 or group["nesterov"]:
                    raise ValueError("materialize_state: momentum with dampening or nesterov")
                state["momentum_buffer"] = torch.zeros_like(p)
