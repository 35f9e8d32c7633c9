"""Input validation before any actor starts: the loss, the data (read into rows, checked for
NaN, Inf, out-of-range indices and labels), a dry run of the model's layers, the memory the
run's parameter copies need, the checkpoint directory. Every refusal is a ``ConfigError``
naming the parameter. The checks an algorithm alone needs live in its own package."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .data.formats import FileData, as_file_data
from .data.inputs import TensorRows, as_tensors
from .errors import ConfigError
from .evaluate import LOSSES, LossFn


def resolve_loss(loss: str | LossFn) -> LossFn:
    """The loss function ``loss`` names (see ``LOSSES``), or ``loss`` itself if callable."""
    if isinstance(loss, str):
        try:
            return LOSSES[loss]
        except KeyError:
            raise ConfigError(
                f"loss: unknown loss {loss!r}; choose one of {', '.join(LOSSES)} or pass a callable"
            ) from None
    if not callable(loss):
        raise ConfigError(f"loss: expected a name or a callable, got {type(loss).__name__}")
    return loss


def _prepare(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, loss: str | LossFn) -> tuple:
    """Cast inputs to the model's dtype (float inputs only) and regression targets too."""
    if x.is_floating_point():
        x = x.to(dtype)
    if y.is_floating_point() or loss == "mse":
        y = y.to(dtype)
    return x.contiguous(), y.contiguous()


def rows_of(
    data: Any, name: str, dtype: torch.dtype, loss: str | LossFn, like: Any = None
) -> TensorRows | FileData:
    """``train_data``/``eval_data`` as rows: a data file (checked, read later by the data
    shards themselves) or in-memory tensors."""
    files = as_file_data(data, name, dtype, loss, like if isinstance(like, FileData) else None)
    if files is not None:
        return files
    return TensorRows(*_prepare(*as_tensors(data, name), dtype, loss))


def dry_run(
    layers: list[nn.Module], stage_of: list[int], x: torch.Tensor, name: str = "train_data"
) -> torch.Tensor:
    """Forward a few examples of ``name`` through every layer; name the layer whose input does
    not fit."""
    modes = [layer.training for layer in layers]
    out = x.clone()  # a layer that works in place (ReLU(inplace=True)) must not edit the data
    try:
        with torch.no_grad():
            for i, layer in enumerate(layers):
                layer.eval()  # eval mode: a batch of one is fine and no buffer changes
                try:
                    out = layer(out)
                except Exception as exc:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
                    where = (
                        f"the inputs of {name} (each shaped {tuple(x.shape[1:])})"
                        if i == 0
                        else f"the output of layer {i - 1} (shape {shape})"
                    )
                    raise ConfigError(
                        f"model: layer {i} ({type(layer).__name__}) in stage {stage_of[i]} "
                        f"cannot take {where}: {exc}"
                    ) from None
                if not isinstance(out, torch.Tensor):
                    raise ConfigError(
                        f"model: layer {i} ({type(layer).__name__}) returns "
                        f"{type(out).__name__}; stages pass single tensors"
                    )
    finally:
        for layer, mode in zip(layers, modes):
            layer.train(mode)
    return out


def check_inputs(
    name: str, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor | None = None
) -> None:
    """What a dry run on two examples cannot see: NaN or Inf anywhere in the data (every push
    of a batch holding one would be rejected, silently), or an index into a first-layer
    Embedding that is out of range (it would fail mid-run, in some replica's step)."""
    for part, values in (("inputs", x), ("targets", y)):
        if values is not None and values.is_floating_point():
            bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                value = values[row].reshape(-1)[~torch.isfinite(values[row].reshape(-1))][0]
                raise ConfigError(
                    f"{name}: row {row} of the {part} holds {float(value)} "
                    f"({int(bad.sum())} rows hold NaN or Inf); clean or drop them"
                )
    first = layers[0]
    if isinstance(first, (nn.Embedding, nn.EmbeddingBag)) and not x.is_floating_point():
        n = first.num_embeddings
        bad = ((x < 0) | (x >= n)).reshape(len(x), -1)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0])
            index = int(x[row].reshape(-1)[bad[row]][0])
            raise ConfigError(
                f"{name}: row {row} holds index {index}, out of range for the first layer, "
                f"{type(first).__name__} of {n} entries (indices must be in 0..{n - 1})"
            )


def check_targets(
    name: str, out: torch.Tensor, y: torch.Tensor, loss: str | LossFn, loss_fn: LossFn
) -> None:
    """Targets must suit the loss: integer labels in range for cross-entropy, matching shapes
    for mse, and any callable must return a scalar on one example."""
    if loss == "cross_entropy":
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ConfigError(f"{name}: cross_entropy needs integer class labels, got {y.dtype}")
        classes = out.shape[1] if out.dim() > 1 else out.shape[0]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            wrong = (y < 0) | (y >= classes)
            row = int(wrong.reshape(len(y), -1).any(1).nonzero()[0, 0])  # the first bad row
            bad = int(y[row].reshape(-1)[wrong[row].reshape(-1)][0])
            raise ConfigError(
                f"{name}: row {row}: label {bad} is out of range for cross_entropy over the "
                "model's "
                f"{classes} outputs (labels must be in 0..{classes - 1})"
            )
    elif loss == "mse" and tuple(out.shape[1:]) != tuple(y.shape[1:]):
        raise ConfigError(
            f"{name}: mse needs targets shaped like the output, {tuple(out.shape[1:])} per "
            f"example, got {tuple(y.shape[1:])}"
        )
    try:
        value = loss_fn(out, y[: len(out)])
    except Exception as exc:
        raise ConfigError(f"loss: fails on the model's output and the targets: {exc}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ConfigError("loss: must return a scalar tensor")


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(total: int, dtype: torch.dtype, config: Any, state: tuple[int, str]) -> None:
    """Refuse a run whose parameter copies cannot fit in this machine's memory (in-process:
    every replica's copy, the shards' values, the algorithm's ``state`` (parameter-sized
    vectors per parameter, and what they are) and the initial vector), instead of failing in
    an allocation half-way through spawning actors."""
    if config.runtime != "local":
        return  # the copies are spread over processes or nodes with memory of their own
    vectors, what = state
    copies = config.replicas + 2 + vectors
    need = total * dtype.itemsize * copies
    free = available_memory()
    if free is not None and need > free:
        raise ConfigError(
            f"model: {total:,} parameters need about {need / 2**30:.1f} GiB for "
            f"{config.replicas} replicas, the shards and {what}, more than "
            f"the {free / 2**30:.1f} GiB of memory available"
        )


def check_checkpoint_dir(path: str | None) -> None:
    """A checkpoint directory must be one we can write into (made if missing)."""
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"checkpoint_dir: cannot use {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"checkpoint_dir: {path} is not writable")
