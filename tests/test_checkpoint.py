"""Checkpoints on disk: round trip, atomic replacement, and every way a file can be wrong."""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from support import mlp

from distbelief.core.flat import flatten
from distbelief.core.layout import Layout
from distbelief.storage import checkpoint as ckpt


def _layout(model, shards: int = 2) -> Layout:
    sizes = [p.numel() for p in model.parameters()]
    return Layout.build([sum(sizes)], shards, sizes)


def _adagrad_after(steps: int, param: torch.nn.Parameter, opt: torch.optim.Optimizer) -> None:
    g = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        param.grad = torch.randn(param.shape, generator=g, dtype=param.dtype)
        opt.step()


def _shards(model, layout: Layout, steps: int = 3) -> tuple[list, list]:
    """Shard states whose optimizers took ``steps`` Adagrad steps, and those optimizers."""
    flat = flatten(model.children())
    states, opts = [], []
    for k, (a, b) in enumerate(layout.shard_ranges):
        p = torch.nn.Parameter(flat[a:b].clone())
        opt = torch.optim.Adagrad([p], lr=0.1)
        _adagrad_after(steps, p, opt)
        opts.append((p, opt))
        states.append(
            ckpt.ShardState(
                k, p.detach().clone(), {0: opt.state_dict()}, {0: 7 + k}, {"updates_applied": 3}
            )
        )
    return states, opts


def _save(root: Path, update: int = 12, model=None, shards: int = 2, **kw) -> Path:
    model = model or mlp([3, 5, 2])
    layout = _layout(model, shards)
    states, _ = _shards(model, layout)
    return ckpt.save(
        root,
        update,
        states,
        layout=layout,
        parameters=ckpt.describe_parameters(model),
        config={"lr": 0.1, "optimizer": "adagrad"},
        positions={0: {"epoch": 1, "step": 40}, 1: {"epoch": 1, "step": 38}},
        **kw,
    )


def test_round_trip_restores_weights_versions_positions_and_optimizer_state(tmp_path):
    model = mlp([3, 5, 2])
    layout = _layout(model)
    states, opts = _shards(model, layout)
    path = ckpt.save(
        tmp_path, 12, states, layout=layout, parameters=ckpt.describe_parameters(model),
        config={"lr": 0.1}, positions={0: {"epoch": 1, "step": 40}},
    )  # fmt: skip
    loaded = ckpt.load(tmp_path)
    assert loaded.path == path and loaded.update == 12
    assert loaded.positions == {0: {"epoch": 1, "step": 40}}
    assert torch.equal(loaded.weights, torch.cat([s.weights for s in states]))
    ckpt.check_compatible(loaded, ckpt.describe_parameters(model), layout)
    for saved, (p, opt) in zip(loaded.shards, opts):
        assert saved.versions == {0: 7 + saved.index}
        # An optimizer restored from the checkpoint continues exactly as the original does.
        p2 = torch.nn.Parameter(saved.weights.clone())
        opt2 = torch.optim.Adagrad([p2], lr=0.1)
        opt2.load_state_dict(saved.optimizer[0])
        _adagrad_after(4, p, opt)
        _adagrad_after(4, p2, opt2)
        assert torch.equal(p, p2)


def test_a_newer_checkpoint_replaces_the_older_only_once_whole(tmp_path):
    first = _save(tmp_path, update=10)
    # A crash half-way through the next write leaves a temporary directory: it is not a
    # checkpoint, and the previous one still loads.
    (tmp_path / ".tmp-crashed").mkdir()
    (tmp_path / ".tmp-crashed" / "shard0.safetensors").write_bytes(b"half")
    assert ckpt.load(tmp_path).path == first
    second = _save(tmp_path, update=20)
    assert ckpt.checkpoints(tmp_path) == [second] and not first.exists()
    third = _save(tmp_path, update=30, keep=2)
    assert ckpt.checkpoints(tmp_path) == [second, third]
    assert ckpt.load(tmp_path).update == 30


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_a_kill_while_an_older_checkpoint_is_removed_leaves_no_half_checkpoint(
    tmp_path, monkeypatch
):
    first = _save(tmp_path, update=10)

    def killed_midway(path, ignore_errors=False):  # one file gone, then the kill
        next(Path(path).rglob("shard1.safetensors")).unlink()
        raise Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        _save(tmp_path, update=20)
    monkeypatch.undo()
    second = tmp_path / ckpt.name_of(20)
    assert ckpt.checkpoints(tmp_path) == [second] and not first.exists()
    assert ckpt.load(tmp_path).update == 20
    assert ckpt.remove_partial(tmp_path) and sorted(tmp_path.iterdir()) == [second]


def test_a_kill_while_the_same_update_is_written_again_keeps_a_whole_checkpoint(
    tmp_path, monkeypatch
):
    first = _save(tmp_path, update=10)
    before = ckpt.load(first).weights
    rename = ckpt.os.rename

    def killed_before_the_new_one_is_in(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise Killed
        rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", killed_before_the_new_one_is_in)
    with pytest.raises(Killed):
        _save(tmp_path, update=10)
    monkeypatch.undo()
    loaded = ckpt.load(tmp_path)  # the old copy, set aside whole
    assert loaded.update == 10 and torch.equal(loaded.weights, before)
    # the next write (the same update again) puts it back under its name, alone
    assert _save(tmp_path, update=10) == first
    assert ckpt.checkpoints(tmp_path) == [first] and sorted(tmp_path.iterdir()) == [first]


def test_a_checkpoint_rotated_away_while_it_is_read_gives_the_newer_one(tmp_path, monkeypatch):
    _save(tmp_path, update=10)
    verified = ckpt._verified

    def a_run_writes_the_next_one(file, expected):
        if file.parent.name == ckpt.name_of(10):
            _save(tmp_path, update=20)  # keep=1: checkpoint 10 goes
        return verified(file, expected)

    monkeypatch.setattr(ckpt, "_verified", a_run_writes_the_next_one)
    assert ckpt.load(tmp_path).update == 20


def _corrupt_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "shard1.safetensors").write_bytes(b"x" * 10), r"shard1.* truncated"),
        (lambda d: _corrupt_last_byte(d / "shard0.safetensors"), r"shard0.* corrupted"),
        (lambda d: (d / "shard0.safetensors").unlink(), r"shard0.* cannot be read"),
        (lambda d: (d / "manifest.json").write_text("{not json"), r"manifest.json cannot be read"),
        (
            lambda d: (d / "manifest.json").write_text(json.dumps({"format": 99})),
            r"manifest.json has format 99",
        ),
    ],
    ids=["truncated", "corrupted", "missing", "not-json", "format"],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, match):
    path = _save(tmp_path)
    damage(path)
    with pytest.raises(ckpt.CheckpointError, match=rf"^resume: .*{match}"):
        ckpt.load(path)


def test_no_checkpoint_where_one_is_expected(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nowhere")
    with pytest.raises(ckpt.CheckpointError, match="holds no checkpoint"):
        ckpt.load(tmp_path)


def test_a_checkpoint_of_another_model_or_layout_is_refused_naming_the_mismatch(tmp_path):
    _save(tmp_path, model=mlp([3, 5, 2]), shards=2)
    loaded = ckpt.load(tmp_path)
    wider = mlp([3, 6, 2])
    with pytest.raises(ckpt.CheckpointError, match=r"parameter '0.weight' has shape \[6, 3\]"):
        ckpt.check_compatible(loaded, ckpt.describe_parameters(wider), _layout(wider))
    deeper = mlp([3, 5, 5, 2])
    with pytest.raises(ckpt.CheckpointError, match="with 4 parameter tensors, this model has 6"):
        ckpt.check_compatible(loaded, ckpt.describe_parameters(deeper), _layout(deeper, 2))
    same = mlp([3, 5, 2])
    with pytest.raises(ckpt.CheckpointError, match="taken with 2 shards .* this run has 3"):
        ckpt.check_compatible(loaded, ckpt.describe_parameters(same), _layout(same, 3))
    as_double = mlp([3, 5, 2], dtype=torch.float64)
    with pytest.raises(ckpt.CheckpointError, match="has dtype float64"):
        ckpt.check_compatible(loaded, ckpt.describe_parameters(as_double), _layout(as_double))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    _save(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert ckpt.load(tmp_path).update == 12


# ------------------------------------------------------------------ a shard's own state


def _shard(model, layout: Layout, k: int, optimizer: str = "adagrad", state=None):
    from distbelief.algorithms.downpour.parameter_shard import ParameterShard

    a, b = layout.shard_ranges[k]
    flat = flatten(model.children())
    return ParameterShard(k, flat[a:b], a, layout.segments_of_shard(k), optimizer, 0.1, state)


def _step(shard, seed: int) -> None:
    """One push to each of the shard's segments, applied as on_push does."""
    g = torch.Generator().manual_seed(seed)
    for held in shard.held.values():
        held.apply([torch.randn(hi - lo, generator=g) for lo, hi in _pieces(held)])


def _pieces(held) -> list[tuple[int, int]]:
    return [
        (0, len(held.values)) if part is None else (part.start, part.stop) for part in held.parts
    ]


@pytest.mark.parametrize("optimizer", ["adagrad", "adam", "momentum"])
@pytest.mark.parametrize("shared", [False, True])
def test_a_shard_restored_from_disk_steps_exactly_as_the_original(tmp_path, optimizer, shared):
    model = mlp([3, 5, 4, 2])
    sizes = [p.numel() for p in model.parameters()]
    # two stages, so that a shard holds two segments with their own rules and versions
    layout = Layout.build([sizes[0] + sizes[1], sum(sizes[2:])], 2, sizes)
    originals = [_shard(model, layout, k, optimizer) for k in range(2)]
    for k, shard in enumerate(originals):
        for i in range(3 + k):
            _step(shard, 10 * k + i)
    path = ckpt.save(
        tmp_path, 7, [s.export_state() for s in originals], layout=layout,
        parameters=ckpt.describe_parameters(model), config={}, positions={},
    )  # fmt: skip
    loaded = ckpt.load(path)
    for k, original in enumerate(originals):
        restored = _shard(model, layout, k, optimizer)
        if shared:
            restored.share_memory(
                contextlib.nullcontext()
            )  # restore writes into the shared tensors in place
        restored.restore(loaded.shards[k])
        assert restored.updates_applied == original.updates_applied
        assert {s: h.version for s, h in restored.held.items()} == {
            s: h.version for s, h in original.held.items()
        }
        for shard in (original, restored):
            _step(shard, 99)
        assert torch.equal(restored.weights, original.weights)


def test_a_shard_restored_without_optimizer_state_starts_its_rule_afresh():
    model = mlp([3, 5, 2])
    layout = _layout(model, 1)
    original = _shard(model, layout, 0)
    _step(original, 1)
    state = original.export_state()
    fresh = _shard(model, layout, 0)
    fresh.restore(ckpt.ShardState(0, state.weights, None, state.versions))
    again = _shard(model, layout, 0, state=ckpt.ShardState(0, state.weights))
    for shard in (fresh, again):
        _step(shard, 2)
    # Adagrad afresh: the second step is as large as a first step, not damped by the first.
    assert torch.equal(fresh.weights, again.weights)
    _step(original, 2)
    assert not torch.equal(fresh.weights, original.weights)
    assert fresh.held[0].version == 2 and again.held[0].version == 1
    with pytest.raises(ValueError, match="shard 1 given to shard 0"):
        fresh.restore(ckpt.ShardState(1, state.weights))
