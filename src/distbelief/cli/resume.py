"""``--config FILE`` and ``--resume DIR``: flags from a file or a checkpoint as the command's
defaults, and what a resumed run must share with its checkpoint (the settings' declared
policies, ``options.MAY_DIFFER_ON_RESUME`` and ``options.NOT_DEFAULT_ON_RESUME``)."""

from __future__ import annotations

import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import typer
from torch import nn

from .. import models as modelspec
from ..core.flat import parameters_of
from ..core.layout import Layout
from ..core.partition import as_layers, layer_sizes, resolve_split_points, split_layers
from ..errors import ConfigError
from ..storage import checkpoint as checkpoints
from .app import UsageFailure, strict_json
from .options import MAY_DIFFER_ON_RESUME, NOT_DEFAULT_ON_RESUME


def _param_type(param: Any) -> type:
    """The Python type a command parameter takes, or of each of its values if it takes
    several (typer's own annotation, or click's type name)."""
    descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.26 (vendored click)
    if descriptor is not None:
        kind = descriptor.annotation
        if typing.get_origin(kind) in (list, tuple):
            kind = (typing.get_args(kind) or (str,))[0]
        if isinstance(kind, type):
            return kind
    name = getattr(getattr(param, "type", None), "name", "text")
    return {"integer": int, "float": float, "boolean": bool}.get(name, str)


def _fits(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def _config_keys(command: Any) -> dict[str, Any]:
    """Key -> parameter of ``command``: each parameter's name and its long flags' names
    (``batch_size`` and ``batch-size``; ``json`` for ``--json``)."""
    keys: dict[str, Any] = {}
    for param in command.params:
        keys[param.name] = param
        for opt in getattr(param, "opts", ()):
            if opt.startswith("--"):
                keys[opt[2:]] = keys[opt[2:].replace("-", "_")] = param
    return keys


def load_config(ctx: typer.Context, param: Any, value: str | None) -> str | None:
    """``--config FILE``: the TOML file's keys become the command's defaults, so flags given
    on the command line win. The accepted keys and their types are the command's own
    parameters (whatever flags it has). Unknown keys and wrong types are usage errors."""
    if value is None:
        return None
    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageFailure(f"config: cannot read {value!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageFailure(f"config: {value!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageFailure(
            f"config: {value!r} is not a TOML text file (byte {exc.start} is not UTF-8)"
        ) from None
    keys = _config_keys(ctx.command)
    defaults: dict[str, Any] = {}
    for key, v in data.items():
        target = keys.get(key)
        if target is None or target.name == param.name:
            raise UsageFailure(
                f"config: unknown key {key!r} in {value!r}; the keys are the flags of "
                f"{ctx.info_name}, e.g. replicas, batch_size, lr"
            )
        kind = _param_type(target)
        if getattr(target, "multiple", False) or getattr(target, "nargs", 1) == -1:
            if not (isinstance(v, list) and all(_fits(item, kind) for item in v)):
                raise UsageFailure(
                    f"config: key {key!r} in {value!r} must be a list of {kind.__name__}, got "
                    f"{type(v).__name__} {v!r}"
                )
        elif not _fits(v, kind):
            raise UsageFailure(
                f"config: key {key!r} in {value!r} must be {kind.__name__}, got "
                f"{type(v).__name__} {v!r}"
            )
        defaults[target.name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def load_resume(ctx: typer.Context, param: Any, value: str | None) -> str | None:
    """``--resume DIR``: verify the checkpoint now (before any data or actor) and take the
    flags it recorded as the command's defaults; flags given on the command line win, and
    ``train_command`` refuses those that must agree but differ."""
    if value is None:
        return None
    try:
        ckpt = checkpoints.load(value)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    flags = ckpt.manifest["config"].get("meta")
    if not isinstance(flags, dict) or not flags.keys() & {"hidden", "model"}:
        raise UsageFailure(
            f"resume: {ckpt.path / checkpoints.MANIFEST} records no flags of distbelief train "
            "(written by distbelief.train?); resume it with distbelief.train(resume=...)"
        )
    keys = _config_keys(ctx.command)
    unknown = [k for k in flags if k not in keys]
    if unknown:
        raise UsageFailure(
            f"resume: {ckpt.path / checkpoints.MANIFEST} records unknown flag {unknown[0]!r}"
        )
    # A fault injected into the run that wrote it is not injected again, and the runtime's own
    # options go with the runtime, which may change: they are given again if wanted.
    defaults = {keys[k].name: v for k, v in flags.items() if k not in NOT_DEFAULT_ON_RESUME}
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["resume"] = (ckpt.path, flags)
    ctx.meta["resume_checkpoint"] = ckpt
    return value


def _source(ctx: typer.Context, name: str) -> str:
    """Where a parameter's value came from: COMMANDLINE, DEFAULT_MAP (--config, --resume),
    DEFAULT... (click's ParameterSource by name: typer vendors its own click)."""
    source = ctx.get_parameter_source(name)
    return source.name if source is not None else ""


def model_spec(
    ctx: typer.Context, model: str | None, hidden: str | None, recorded_sha256: str | None
) -> modelspec.ModelSpec | None:
    """Load ``--model`` (None: the preset's MLP). ``--hidden`` with it is refused, unless the
    hidden widths came from a file (--config, --resume) and --model from the command line.
    A file that changed since a checkpoint or config.toml recorded it is refused, unless
    ``--model`` is given again on the command line."""
    if model is None:
        return None
    given = _source(ctx, "model") == "COMMANDLINE"
    if hidden is not None:
        from_file = _source(ctx, "hidden") == "DEFAULT_MAP"
        if not (from_file and given):
            raise UsageFailure("hidden: shapes the built-in MLP; with --model, drop --hidden")
    try:
        spec = modelspec.load(model)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    if recorded_sha256 is not None and recorded_sha256 != spec.sha256 and not given:
        raise UsageFailure(
            f"model: {spec.source} changed since it was recorded (sha256 {recorded_sha256[:12]} "
            f"then, {(spec.sha256 or 'none')[:12]} now); give --model {model} again to use it"
        )
    return spec


def nothing_to_train(message: str, resumed_from: Path, as_json: bool) -> None:
    """Say that a resumed run has nothing left to train (it exits 0, having written nothing)."""
    print(f"distbelief: {message}", file=sys.stderr)
    if as_json:
        print(strict_json({"nothing_to_train": True, "message": message, "examples": 0,
                           "resumed_from": str(resumed_from)}))  # fmt: skip


def check_resume_flags(path: Path, recorded: dict[str, Any], resolved: dict[str, Any]) -> None:
    """Refuse a flag that differs from what the checkpoint recorded, unless it may."""
    for key in (recorded.keys() | resolved.keys()) - MAY_DIFFER_ON_RESUME:
        if recorded.get(key) != resolved.get(key):
            flag = key.replace("_", "-")
            raise UsageFailure(
                f"{flag}: {path / checkpoints.MANIFEST} was taken with {flag} "
                f"{recorded.get(key)!r}, this run has {resolved.get(key)!r}; resume with the "
                "same (or leave the flag out)"
            )


def check_resumed_model(
    ckpt: checkpoints.Checkpoint, model: nn.Sequential, settings: dict[str, Any]
) -> None:
    """Refuse a checkpoint of another model or layout (as ``train`` would)."""
    layers = as_layers(model)
    stage_layers = split_layers(
        layers, resolve_split_points(layer_sizes(layers), settings["stages"])
    )
    try:
        checkpoints.check_compatible(
            ckpt,
            checkpoints.describe_parameters(layers),
            _layout(stage_layers, settings["shards"]),
        )
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


def _layout(stage_layers: list[list[nn.Module]], shards: int) -> Layout:
    """The flat parameter space of these stages over ``shards`` shards (as the run lays it)."""
    sizes = [[p.numel() for p in parameters_of(group)] for group in stage_layers]
    return Layout.build([sum(s) for s in sizes], shards, [n for s in sizes for n in s])
