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

from .errors import ConfigError

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
