"""Models: the MLP of the presets, benchmarks and tests (:func:`mlp`), and ``--model SPEC``,
a model of the user's own, named as ``path/to/file.py:NAME`` or ``package.module:NAME``.

NAME is an ``nn.Sequential`` (or a list of modules), or a function (or class) returning one; a
function that declares ``in_features`` / ``out_features`` gets the data's input width and output
count. Every way a spec can be wrong is a :class:`ConfigError` of one line naming the spec.

A module loaded from a file is not importable by that name in other processes, so it is
registered with cloudpickle to travel *by value* (:func:`ship_by_value`): its classes and
functions reach Ray workers without the file being on their path.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .nn import LocallyConnected1d

WIDTH_ARGUMENTS = ("in_features", "out_features")
"""Keyword arguments a model function may declare to receive the data's widths."""


@dataclass(frozen=True)
class ModelSpec:
    """A loaded ``--model`` spec."""

    spec: str
    """As given: ``file.py:NAME`` or ``package.module:NAME``."""
    module: ModuleType
    """The module NAME was found in."""
    name: str
    """NAME."""
    source: str | None
    """The module's file, if it has one (what the hash covers)."""
    sha256: str | None
    """Hex SHA-256 of ``source``'s bytes: a run directory and a checkpoint record it, so a
    resumed run can tell that the file changed."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"model: no file {str(path)!r} (from --model {spec})")
    # One name per file content: loading the same file twice reuses the module, an edited
    # file is a new one (never a stale class under the old name).
    name = f"distbelief_model_{path.stem}_{file_sha256(path)[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"model: cannot load {str(path)!r} as Python (from --model {spec})")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # cloudpickle's by-value registration needs it there
    # As `python file.py` would: the file's own directory is importable while it loads.
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        loader_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise ConfigError(f"model: importing {str(path)!r} raised {_first_line(exc)}") from None
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def _import_module(spec: str, dotted: str) -> ModuleType:
    if os.getcwd() not in sys.path and "" not in sys.path:
        # as `python -m` does: modules of the working directory are importable
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (dotted == exc.name or dotted.startswith(exc.name + ".")):
            raise ConfigError(
                f"model: no module named {exc.name!r} (from --model {spec})"
            ) from None
        raise ConfigError(f"model: importing {dotted!r} raised {_first_line(exc)}") from None
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"model: importing {dotted!r} raised {_first_line(exc)}") from None


def load(spec: str) -> ModelSpec:
    """Import the module a spec names and check that it defines NAME."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ConfigError(
            f"model: expected path/to/file.py:NAME or package.module:NAME, got {spec!r}"
        )
    if _is_file_spec(target):
        path = Path(target)
        module = _import_file(spec, path)
        where = repr(str(path))
    else:
        module = _import_module(spec, target)
        where = f"module {target!r}"
    if not hasattr(module, name):
        raise ConfigError(f"model: {where} defines no {name!r}")
    source = getattr(module, "__file__", None)
    sha = file_sha256(source) if source and Path(source).is_file() else None
    return ModelSpec(spec, module, name, source, sha)


def _as_sequential(value: Any, made: bool) -> nn.Sequential | None:
    if isinstance(value, nn.Sequential):
        return value if made else copy.deepcopy(value)  # a module-level model: a fresh copy
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, nn.Module) for m in value):
        return nn.Sequential(*(value if made else copy.deepcopy(list(value))))
    return None


def build(ms: ModelSpec, in_features: int, out_features: int, seed: int) -> nn.Sequential:
    """The model NAME gives, initialised from ``seed`` (torch's global RNG left as it was)."""
    value = getattr(ms.module, ms.name)
    model = _as_sequential(value, made=False)
    if model is not None:
        return model
    if not callable(value):
        raise ConfigError(
            f"model: {ms.spec} is a {type(value).__name__}, not an nn.Sequential, a list of "
            "modules or a function returning one"
        )
    try:
        params = inspect.signature(value).parameters
    except (TypeError, ValueError):
        params = {}
    widths = dict(zip(WIDTH_ARGUMENTS, (in_features, out_features)))
    kwargs = {k: v for k, v in widths.items() if k in params}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            made = value(**kwargs)
        except Exception as exc:
            raise ConfigError(f"model: calling {ms.spec} raised {_first_line(exc)}") from None
    model = _as_sequential(made, made=True)
    if model is None:
        raise ConfigError(
            f"model: {ms.spec} returned a {type(made).__name__}, not an nn.Sequential or a "
            "list of modules"
        )
    return model


def check_input_width(ms: ModelSpec, model: nn.Sequential, in_features: int) -> None:
    """Forward two rows of zeros of the data's width; a model that cannot take them is a
    usage error naming the spec (before any data is generated or actor started)."""
    modes = [m.training for m in model.modules()]
    model.eval()  # no buffer changes, a batch of two is fine for any layer
    try:
        with torch.no_grad():
            first = next(iter(model), None)
            index = isinstance(first, (nn.Embedding, nn.EmbeddingBag))  # takes integer rows
            model(torch.zeros(2, in_features, dtype=torch.long if index else torch.float32))
    except Exception as exc:
        raise ConfigError(
            f"model: {ms.spec} does not take the data's {in_features} input features: "
            f"{_first_line(exc)}"
        ) from None
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


def ship_by_value(ms: ModelSpec) -> None:
    """Let the model's classes and functions travel by value to Ray workers (which cannot
    import a file of the user's working directory, nor a module loaded under our name).
    A module of an installed package (outside the working directory) is left to travel by
    reference. Registers with Ray's cloudpickle (and the standalone one, if installed)."""
    if not ms.module.__name__.startswith("distbelief_model_"):
        source = Path(ms.source or "/").resolve()
        if not source.is_relative_to(Path.cwd().resolve()):
            return  # an installed package: importable on the workers, sent by reference
    for name in ("ray.cloudpickle", "cloudpickle"):
        try:
            pickler = importlib.import_module(name)
        except ImportError:
            continue
        pickler.register_pickle_by_value(ms.module)  # a set: registering twice is harmless


def mlp(
    widths: Sequence[int],
    activation: type[nn.Module] = nn.ReLU,
    output_activation: type[nn.Module] | None = None,
    seed: int = 0,
) -> nn.Sequential:
    """Linear layers of the given widths, ``activation`` between them and ``output_activation``
    (if any) after the last; initialised from ``seed``, leaving torch's global RNG as it was."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(activation())
    if output_activation is not None:
        layers.append(output_activation())
    return nn.Sequential(*layers)


def mnist1d_local(
    in_features: int = 40,
    out_features: int = 10,
    channels: Sequence[int] = (16, 32, 40),
    seed: int | None = None,
) -> nn.Sequential:
    """A locally-connected net for 1-D signals (MNIST-1D's 40 samples, 10 classes): three
    :class:`~distbelief.nn.LocallyConnected1d` layers with ReLU (kernel 5 at full length, then
    kernel 3 at stride 2 twice: lengths 40, 20, 10 for MNIST-1D) and a ``Linear`` classifier.
    With the default channels (16, 32, 40) it has 78,010 parameters, about the main job's MLP
    (78,858).

    Every layer is one a stage's partitions can split (``core/blocks.py``), at any stage cut.
    ``distbelief train --model distbelief.models:mnist1d_local`` trains it; ``seed`` (if
    given) initialises it, leaving torch's global RNG as it was.
    """
    c1, c2, c3 = channels
    l1 = in_features
    l2 = (l1 + 2 - 3) // 2 + 1  # kernel 3, stride 2, padding 1: ceil(L / 2)
    l3 = (l2 + 2 - 3) // 2 + 1
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return nn.Sequential(
            nn.Unflatten(1, (1, l1)),  # (N, 40) -> (N, 1, 40): one input channel
            LocallyConnected1d(1, c1, 5, l1, padding=2), nn.ReLU(),
            LocallyConnected1d(c1, c2, 3, l1, stride=2, padding=1), nn.ReLU(),
            LocallyConnected1d(c2, c3, 3, l2, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(c3 * l3, out_features),
        )  # fmt: skip
