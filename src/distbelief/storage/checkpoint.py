"""Checkpoints on disk: a JSON manifest plus one safetensors file per PS shard. No actor code.

A checkpoint is a directory ``<dir>/ckpt-<update>``:

- ``shard<k>.safetensors`` per shard: its slice of the flat parameter vector (``weights``) and
  every tensor of its optimizer state (names from :func:`flatten_state`).
- ``manifest.json``, written last: the format version, the update count, the layout, a
  description of the model's parameters (names, shapes, dtypes), the configuration, each
  replica's data position, every shard's versions, counters and the non-tensor part of its
  optimizer state, and the sha256 and size of every file.

Writes are atomic: files go into a temporary directory (each written, flushed and fsynced),
the manifest last, then one ``rename`` makes it ``ckpt-<update>``; only then are older
checkpoints removed, each first renamed out of sight, so a crash at any moment leaves the
previous whole checkpoint and no half-removed one is ever listed. Loading
reads JSON and safetensors only (nothing is unpickled) and verifies every file's size and
hash before using it; anything wrong is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from ..core.flat import parameters_of
from ..core.layout import Layout
from ..errors import ConfigError

FORMAT_VERSION = 1
"""Bumped when the layout of a checkpoint changes; a loader refuses versions it does not know."""
MANIFEST = "manifest.json"
PREFIX = "ckpt-"
REPLACED = ".replaced"
"""Suffix of the old copy that a rewrite of the same update sets aside until the new one is in."""

log = logging.getLogger("distbelief")


class CheckpointError(ConfigError):
    """A checkpoint cannot be used: missing, truncated, corrupted, or from another model.

    A ``ConfigError`` (the CLI exits 2 with one line): the message names the file and what is
    wrong with it."""


@dataclass(frozen=True)
class ShardState:
    """Everything one PS shard needs to carry on where it stopped."""

    index: int
    """The shard's number."""
    weights: torch.Tensor
    """Its slice of the flat parameter vector."""
    optimizer: Any = None
    """Its update rules' state, e.g. ``{stage: optimizer.state_dict()}`` (any nesting of
    dicts, lists, tensors and JSON values)."""
    versions: Mapping[int, int] = field(default_factory=dict)
    """Updates applied to each of its segments (by stage): versions keep increasing across
    a restore, since staleness is computed from them."""
    counters: Mapping[str, float] = field(default_factory=dict)
    """updates_applied, rejected_pushes, ... at the time of the checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    """The ``ckpt-<update>`` directory it was read from."""
    update: int
    """Updates applied over all shards when it was taken."""
    shards: tuple[ShardState, ...]
    """Per-shard state, by shard number."""
    manifest: dict[str, Any]
    """The whole manifest (layout, parameters, config, positions, files)."""

    @property
    def weights(self) -> torch.Tensor:
        """The whole flat parameter vector."""
        return torch.cat([s.weights for s in self.shards])

    @property
    def positions(self) -> dict[int, dict[str, int]]:
        """Each replica's data position, e.g. ``{0: {"epoch": 2, "step": 310}}``."""
        return {int(r): p for r, p in self.manifest["positions"].items()}


# ------------------------------------------------------------------ describing what was trained


def describe_parameters(layers: Iterable[nn.Module]) -> list[dict[str, Any]]:
    """Name, shape and dtype of every parameter in layout order: what a checkpoint must match."""
    model = nn.Sequential(*layers)
    names = {id(p): name for name, p in model.named_parameters()}
    return [
        {"name": names[id(p)], "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
        for p in parameters_of(model.children())
    ]


def describe_layout(layout: Layout) -> dict[str, Any]:
    """The layout as JSON: total, shard slices, stage ranges, tensor ranges."""
    return {
        "total": layout.total,
        "shard_ranges": [list(r) for r in layout.shard_ranges],
        "stage_ranges": [list(r) for r in layout.stage_ranges],
        "tensor_ranges": [list(r) for r in layout.tensor_ranges],
    }


def check_compatible(
    checkpoint: Checkpoint, parameters: Sequence[Mapping[str, Any]], layout: Layout
) -> None:
    """Refuse a checkpoint of another model, or whose shards cannot be loaded as they are.

    The model must match parameter for parameter (name, shape, dtype); the error names the
    first difference. The shard slices and stage ranges must match too: re-slicing into a
    different shard or stage count is not supported (yet), and the error says which differs.
    """
    where = checkpoint.path / MANIFEST
    theirs = checkpoint.manifest["parameters"]
    if len(theirs) != len(parameters):
        raise CheckpointError(
            f"resume: {where} is of a model with {len(theirs)} parameter tensors, "
            f"this model has {len(parameters)}"
        )
    for mine, saved in zip(parameters, theirs):
        for key in ("name", "shape", "dtype"):
            if mine[key] != saved[key]:
                raise CheckpointError(
                    f"resume: {where} does not match the model: parameter {mine['name']!r} "
                    f"has {key} {mine[key]}, the checkpoint's {saved['name']!r} {saved[key]}"
                )
    saved_layout = checkpoint.manifest["layout"]
    now = describe_layout(layout)
    for key, what in (("shard_ranges", "shards"), ("stage_ranges", "stages")):
        if saved_layout[key] != now[key]:
            raise CheckpointError(
                f"resume: {where} was taken with {len(saved_layout[key])} {what} "
                f"({saved_layout[key]}), this run has {len(now[key])} ({now[key]}); "
                f"resume with the same {what}"
            )


# ------------------------------------------------------------------ optimizer state as tensors


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (e.g. a ``state_dict()``) into named tensors and a JSON skeleton
    in which each tensor is ``{"tensor": name}``. Dict keys keep their type (torch's optimizer
    state is keyed by int)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().contiguous()
            return {"tensor": path}
        if isinstance(value, Mapping):
            return {"dict": [[k, walk(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {"list": [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(f"cannot store a {type(value).__name__} at {path!r} in a checkpoint")

    return tensors, walk(state, prefix)


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`flatten_state`."""
    if "tensor" in skeleton:
        return tensors[skeleton["tensor"]]
    if "dict" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["dict"]}
    if "list" in skeleton:
        return [unflatten_state(v, tensors) for v in skeleton["list"]]
    return skeleton["value"]


# ------------------------------------------------------------------ writing


def name_of(update: int) -> str:
    """The directory name of the checkpoint of ``update`` updates (``ckpt-<update>``)."""
    return f"{PREFIX}{update:012d}"


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    directory: str | os.PathLike,
    update: int,
    shards: Sequence[ShardState],
    *,
    layout: Layout,
    parameters: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    positions: Mapping[int, Mapping[str, int]],
    keep: int = 1,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``update`` updates into ``directory`` atomically; keep the newest
    ``keep`` whole checkpoints (this one included) and remove older ones. Returns its path.
    ``extra``: more JSON for the manifest (Sandblaster's coordinator state, by key)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name_of(update)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        files, shard_meta = {}, []
        for shard in shards:
            tensors, skeleton = flatten_state(shard.optimizer, "optimizer")
            tensors["weights"] = shard.weights.detach().contiguous()
            name = f"shard{shard.index}.safetensors"
            files[name] = _write_file(tmp / name, save_tensors(tensors))
            shard_meta.append(
                {
                    "index": shard.index,
                    "file": name,
                    "optimizer": skeleton,
                    "versions": {str(k): int(v) for k, v in shard.versions.items()},
                    "counters": dict(shard.counters),
                }
            )
        manifest = {
            "format": FORMAT_VERSION,
            "update": update,
            "layout": describe_layout(layout),
            "parameters": [dict(p) for p in parameters],
            "config": dict(config),
            "positions": {str(r): dict(p) for r, p in positions.items()},
            "shards": shard_meta,
            "files": files,
            **(extra or {}),
        }
        text = json.dumps(manifest, indent=1, allow_nan=False).encode()
        _write_file(tmp / MANIFEST, text)  # last: a directory without it is not a checkpoint
        _fsync_dir(tmp)
        replaced = final.with_name(final.name + REPLACED)
        if final.exists():  # the same update written again (e.g. a final one): replace it,
            if replaced.exists():  # keeping the old one whole, under a name that sorts older,
                _discard(replaced)  # until the new one is in place
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced.exists():
        _discard(replaced)
    for old in checkpoints(root)[:-keep]:
        _discard(old)
    return final


def _discard(path: Path) -> None:
    """Remove a checkpoint so that no reader, and no crash midway, sees it half-deleted: one
    rename first makes it a ``.tmp-*`` directory (never listed, and removed by
    :func:`remove_partial`), then its files go."""
    gone = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        os.rename(path, gone / path.name)
    except FileNotFoundError:  # already gone
        pass
    shutil.rmtree(gone, ignore_errors=True)


# ------------------------------------------------------------------ reading


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The whole checkpoints in ``directory`` (those with a manifest), oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if (p / MANIFEST).is_file()]
    # ckpt-<update>.replaced is the copy a rewrite of the same update sets aside: older
    return sorted(
        found, key=lambda p: (p.name.removesuffix(REPLACED), not p.name.endswith(REPLACED))
    )


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint: ``path`` is a ``ckpt-<update>`` directory, or a directory
    of them (the newest is taken). Raises :class:`CheckpointError` naming the bad file."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return _load_one(path)
    for _ in range(8):  # a run writing there may rotate the newest away while it is read
        found = checkpoints(path)
        if not found:
            what = "does not exist" if not path.exists() else "holds no checkpoint"
            raise CheckpointError(f"resume: {path} {what}")
        try:
            return _load_one(found[-1])
        except CheckpointError:
            if found[-1].exists():
                raise
    raise CheckpointError(f"resume: {path}: its checkpoints changed under every read")


def _load_one(path: Path) -> Checkpoint:
    where = path / MANIFEST
    try:
        manifest = json.loads(where.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"resume: {where} cannot be read as JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(
            f"resume: {where} has format {got!r}; this version reads format {FORMAT_VERSION}"
        )
    try:
        files = manifest["files"]
        shard_meta = manifest["shards"]
        update = int(manifest["update"])
        for key in ("layout", "parameters", "config", "positions"):
            manifest[key]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"resume: {where} lacks {exc}") from None
    shards = []
    for meta in shard_meta:
        name = meta["file"]
        try:
            tensors = load_tensors(_verified(path / name, files.get(name)))
        except SafetensorError as exc:  # the hash matched, but the writer wrote garbage
            raise CheckpointError(
                f"resume: {path / name} is not a safetensors file: {exc}"
            ) from None
        if "weights" not in tensors:
            raise CheckpointError(f"resume: {path / name} holds no weights")
        shards.append(
            ShardState(
                index=int(meta["index"]),
                weights=tensors["weights"],
                optimizer=unflatten_state(meta["optimizer"], tensors),
                versions={int(k): int(v) for k, v in meta["versions"].items()},
                counters=meta["counters"],
            )
        )
    shards.sort(key=lambda s: s.index)
    if [s.index for s in shards] != list(range(len(manifest["layout"]["shard_ranges"]))):
        raise CheckpointError(f"resume: {where} does not list every shard's file")
    return Checkpoint(path, update, tuple(shards), manifest)


def _verified(file: Path, expected: Mapping[str, Any] | None) -> bytes:
    """The file's bytes, once its size and sha256 match the manifest's record."""
    if expected is None:
        raise CheckpointError(f"resume: {file} is not recorded in the manifest")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"resume: {file} cannot be read: {exc.strerror}") from None
    if len(data) != expected["bytes"]:
        raise CheckpointError(
            f"resume: {file} is truncated or padded: {len(data)} bytes, "
            f"the manifest records {expected['bytes']}"
        )
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CheckpointError(
            f"resume: {file} is corrupted: its sha256 differs from the manifest's"
        )
    return data


# ------------------------------------------------------------------ periodic writing during a run


def remove_partial(directory: str | os.PathLike) -> list[Path]:
    """Remove what a write cut off by a crash left in ``directory`` (``.tmp-*``: never a
    checkpoint, since the rename that makes one is the last step). Call it before a run that
    writes there starts; returns what was removed."""
    root = Path(directory)
    stale = [p for p in root.glob(".tmp-*") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


PROGRESS = "progress.json"
"""Beside the checkpoints: the updates applied at the last progress report (rewritten at most
every ``PROGRESS_EVERY_S``), so that a resumed run can say how many updates the kill lost (at
least)."""
PROGRESS_EVERY_S = 1.0
"""A write costs ~0.6 ms here: once a second is about nothing, and the estimate stays close."""


class Checkpointer:
    """Writes a run's checkpoints into one directory, each in a background thread.

    The master hands it the shards' states and the replicas' positions; writing (safetensors,
    sha256, fsync) happens in a thread of its own so that training goes on meanwhile. One
    write at a time: a new one first waits for the previous one. A write that fails (a full
    disk, any write error) leaves the previous whole checkpoint as it was (see :func:`save`):
    it is counted (``checkpoint_writes_skipped``), warned about once, and training goes on,
    since stopping would lose more than the checkpoint.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        layout: Layout,
        parameters: Sequence[Mapping[str, Any]],
        config: Mapping[str, Any],
        keep: int = 1,
    ) -> None:
        self.directory = Path(directory)
        self.layout = layout
        self.parameters = [dict(p) for p in parameters]
        self.config = dict(config)
        self.keep = keep
        self.written = 0
        self.skipped = 0  # states not written: not finite, or most pushes rejected
        self.failed = 0  # writes that failed (a full disk, ...): checkpoint_writes_skipped
        self.warned = False
        self.write_s = 0.0  # seconds spent writing (in the background thread)
        self.last: Path | None = None
        self._thread: Any = None
        self._error: BaseException | None = None
        self._noted = float("-inf")  # when progress was last noted (time.monotonic)

    def __getstate__(self) -> dict[str, Any]:  # sent to a master in another process (Ray)
        return {**self.__dict__, "_thread": None, "_error": None}

    def submit(
        self,
        update: int,
        shards: Sequence[ShardState],
        positions: Mapping[int, Mapping[str, int]],
        *,
        wait: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Write a checkpoint of ``update`` updates, in the background unless ``wait``.
        States holding NaN or Inf, or in which most pushes were rejected, are not written
        (the last good checkpoint stays); returns whether it is (being) written."""
        self.join()
        applied = sum(int(s.counters.get("updates_applied", 0)) for s in shards)
        rejected = sum(int(s.counters.get("rejected_pushes", 0)) for s in shards)
        if rejected > applied or not all(bool(torch.isfinite(s.weights).all()) for s in shards):
            self.skipped += 1
            return False
        if wait:
            self._write(update, shards, positions, extra)
            self.join()
            return True
        self._thread = threading.Thread(
            target=self._write, args=(update, shards, positions, extra), name="checkpoint",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        return True

    def _write(
        self,
        update: int,
        shards: Sequence[ShardState],
        positions: Mapping[int, Mapping[str, int]],
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        t = time.perf_counter()
        try:
            self.last = save(
                self.directory, update, shards, layout=self.layout, parameters=self.parameters,
                config=self.config, positions=positions, keep=self.keep, extra=extra,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a write error must not end the run
            self._failed(f"writing the checkpoint of update {update:,} failed", exc)
            return
        except BaseException as exc:  # noqa: BLE001 - raised again by join()
            self._error = exc
            return
        self.written += 1
        self.write_s += time.perf_counter() - t

    def written_at(self, update: int) -> Path | None:
        """The checkpoint of ``update`` updates if it is the last one written (and so the
        newest whole one), else None (not written: skipped, or its write failed)."""
        self.join()
        path = self.directory / name_of(update)
        return path if self.last == path else None

    def join(self) -> None:
        """Wait for the write in progress, if any; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def note_progress(self, updates: int, *, force: bool = False) -> None:
        """Record the updates applied so far, at most every ``PROGRESS_EVERY_S`` unless
        ``force`` (not fsynced: a hint, read by a resumed run)."""
        now = time.monotonic()
        if not force and now - self._noted < PROGRESS_EVERY_S:
            return
        self._noted = now
        tmp = self.directory / f".{PROGRESS}.tmp"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"updates_applied": int(updates)}))
            os.replace(tmp, self.directory / PROGRESS)
        except OSError as exc:  # a hint only: a full disk must not end the run for it
            self._warn("writing the progress note failed", exc)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failed += 1
        self._warn(what, exc)

    def _warn(self, what: str, exc: BaseException) -> None:
        """Warn of the first write error only: on a full disk every later write fails too."""
        if self.warned:
            return
        self.warned = True
        last = f"the last whole one is {self.last}" if self.last else "none was written yet"
        log.warning(
            "checkpoint: %s in %s (%s); training goes on, %s (later write errors are "
            "counted in checkpoint_writes_skipped, not repeated)",
            what, self.directory, exc, last,
        )  # fmt: skip

    @property
    def stats(self) -> dict[str, Any]:
        """Checkpoints written and skipped, seconds spent writing, the last one's path."""
        return {
            "checkpoints_written": self.written,
            "checkpoints_skipped": self.skipped,
            "checkpoint_writes_skipped": self.failed,
            "checkpoint_write_s": self.write_s,
            "last_checkpoint": str(self.last) if self.last is not None else None,
        }


def nothing_left(checkpoint: Checkpoint, epochs: int, train_examples: int) -> str | None:
    """What to say when ``checkpoint`` has trained ``epochs`` epochs of ``train_examples``
    examples (or more) already, so a run resumed from it has nothing to train; else None."""
    done = sum(int(p["examples"]) for p in checkpoint.positions.values())
    if train_examples <= 0 or done < epochs * train_examples:
        return None
    at = done / train_examples
    shown = f"{at:.0f}" if at == round(at) else f"{at:.2f}"
    return f"nothing to train: the checkpoint is at epoch {shown} of {epochs}"


def updates_lost(checkpoint: Checkpoint) -> int | None:
    """Updates applied after ``checkpoint`` by the run that wrote it, as far as its last
    progress report knew (a lower bound: those after that report are not counted); None
    when nothing was recorded."""
    try:
        noted = json.loads((checkpoint.path.parent / PROGRESS).read_text())["updates_applied"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(0, int(noted) - checkpoint.update)
