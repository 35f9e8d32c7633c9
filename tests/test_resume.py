"""Checkpoints during a Downpour run and resuming from them: through ``train``, on every
runtime, and through the CLI (hostile checkpoints, a SIGKILL mid-run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from support import mlp

import distbelief
from distbelief import ConfigError
from distbelief.algorithms.downpour.data_shard import DataShard
from distbelief.algorithms.downpour.messages import (
    CheckpointMark,
    CheckpointRequest,
    ConnectDataShard,
    DataPosition,
    StartReplica,
    StepDone,
)
from distbelief.cli import main
from distbelief.core.layout import Layout
from distbelief.data.inputs import TensorRows
from distbelief.storage import checkpoint

KW = dict(loss="cross_entropy", lr=0.05, batch_size=16, optimizer="adagrad", seed=3)


def toy_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------ through train()


def test_the_final_checkpoint_is_the_result(tmp_path: Path) -> None:
    result = distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=2, shards=2, stages=2,
                              checkpoint_dir=tmp_path, checkpoint_every=10, **KW)  # fmt: skip
    ckpt = checkpoint.load(tmp_path)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == [ckpt.path.name]  # keep=1
    assert torch.equal(ckpt.weights, flat(result.model))
    assert ckpt.update == result.stats["updates_applied_total"]
    assert result.stats["last_checkpoint"] == str(ckpt.path)
    assert result.stats["checkpoints_written"] >= 2  # periodic ones and the final one
    # every step was pushed by the end: the position is the end of the last epoch
    assert ckpt.positions == {0: {"epoch": 2, "step": 0, "steps": 64, "examples": 1024}}
    # each segment's version counts its updates; Adagrad's sums are there, and finite
    versions = [v for s in ckpt.shards for v in s.versions.values()]
    assert sum(versions) == ckpt.update
    sums = [t for s in ckpt.shards for st in s.optimizer.values() for t in _tensors(st)]
    assert sums and all(bool(torch.isfinite(t).all()) and t.abs().sum() > 0 for t in sums)
    assert ckpt.manifest["config"]["seed"] == 3 and ckpt.manifest["config"]["train_examples"] == 512


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def test_resumed_single_replica_run_equals_an_uninterrupted_one_bit_for_bit(
    tmp_path: Path, runtime: str
) -> None:
    # One replica, n_fetch = n_push = 1: the run is deterministic on every runtime (one sender
    # per shard, in order), and a resumed one must start from the checkpoint's parameters,
    # redo nothing and skip nothing: the same parameters, bit for bit.
    rt = dict(runtime=runtime)
    full = distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=4, **KW, **rt)
    distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=2, checkpoint_dir=tmp_path, **KW, **rt)
    kw = {k: v for k, v in KW.items() if k != "seed"}  # the seed comes from the checkpoint
    resumed = distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=4, resume=tmp_path, **kw,
                               **rt)  # fmt: skip
    assert torch.equal(flat(resumed.model), flat(full.model))
    assert resumed.config.seed == 3
    s = resumed.stats
    assert s["resumed_from_update"] == 64 and s["updates_lost"] == 0
    assert s["updates_applied_total"] == full.stats["updates_applied_total"] == 128
    assert s["examples"] == 1024  # this run's own (its speed is this run's)


def test_resume_on_every_runtime(tmp_path: Path, runtime: str) -> None:
    data = toy_data()
    first = distbelief.train(mlp([10, 16, 2]), data, epochs=2, replicas=2, shards=2, n_push=2,
                             runtime=runtime, checkpoint_dir=tmp_path, checkpoint_every=8,
                             eval_data=data, **KW)  # fmt: skip
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.update == first.stats["updates_applied_total"]
    assert torch.equal(ckpt.weights, flat(first.model))
    # Resumed with no step left to take: nothing to train, said before any actor starts.
    # (That a resumed run starts from the checkpoint's weights is the bit-for-bit test above.)
    with pytest.raises(distbelief.NothingToTrain, match="epoch 2 of 2"):
        distbelief.train(mlp([10, 16, 2]), data, epochs=2, replicas=2, shards=2, n_push=2,
                         runtime=runtime, resume=tmp_path, **KW)  # fmt: skip
    resumed = distbelief.train(mlp([10, 16, 2]), data, epochs=3, replicas=2, shards=2, n_push=2,
                               runtime=runtime, resume=tmp_path, checkpoint_dir=tmp_path,
                               eval_data=data, **KW)  # fmt: skip
    s = resumed.stats
    assert s["resumed_from_update"] == ckpt.update
    assert s["examples"] == 512  # the third epoch only, of both replicas
    # each of 2 replicas x 16 steps pushed every 2 steps to 2 shards: 32 updates more
    assert s["updates_applied_total"] == ckpt.update + 32
    assert checkpoint.load(tmp_path).update == s["updates_applied_total"]


def test_positions_are_rounded_down_to_the_last_push() -> None:
    # A data shard reports the latest position whose every earlier step is in the shards:
    # with n_push = 3, the gradient of the steps since the last push is not.
    rows = TensorRows(torch.zeros(100, 2), torch.zeros(100, dtype=torch.long))
    told: list[Any] = []

    class Ctx:
        name, self_ref = "data0", "data0"

        def tell(self, ref: Any, message: Any) -> None:
            told.append(message)

    shard = DataShard(0, rows, 10, 3, 0, 1000, n_push=3,
                      start={"epoch": 1, "step": 2, "steps": 12, "examples": 120})  # fmt: skip
    shard.bind(Ctx())
    shard.receive(ConnectDataShard(("stage",), "master"), None)
    shard.receive(StartReplica(0), None)
    for step in range(12, 12 + 7):  # 7 steps done since the start: 6 of them pushed
        shard.receive(StepDone(step, 0.5), None)
    told.clear()
    shard.receive(CheckpointRequest(1), "master")
    position, mark = told  # to the master; and to its stage, behind the stage's pushes
    assert isinstance(position, DataPosition)
    assert (position.epoch, position.step, position.steps, position.examples) == (1, 8, 18, 180)
    assert mark == CheckpointMark(1, "master")


def test_a_diverged_state_is_never_written(tmp_path: Path) -> None:
    layout = Layout.build([4], 1, [4])
    writer = checkpoint.Checkpointer(tmp_path, layout=layout, parameters=[], config={})
    good = checkpoint.ShardState(0, torch.ones(4), None, {0: 1}, {"updates_applied": 1})
    assert writer.submit(1, [good], {0: {"epoch": 0, "step": 1}}, wait=True)
    bad = checkpoint.ShardState(0, torch.tensor([1.0, float("nan"), 0, 0]), None, {0: 2},
                                {"updates_applied": 2})  # fmt: skip
    assert not writer.submit(2, [bad], {0: {"epoch": 0, "step": 2}}, wait=True)
    assert checkpoint.load(tmp_path).update == 1 and writer.stats["checkpoints_skipped"] == 1


def test_resume_refuses_another_layout_or_replica_count(tmp_path: Path) -> None:
    distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=1, shards=2, replicas=2,
                     checkpoint_dir=tmp_path, **KW)  # fmt: skip
    for change, named in (({"shards": 1}, "shards"), ({"replicas": 1}, "replicas"),
                          ({"batch_size": 8}, "batch_size"), ({"seed": 4}, "seed")):  # fmt: skip
        kw = {**KW, "shards": 2, "replicas": 2, **change}
        with pytest.raises(ConfigError, match=named):
            distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=2, resume=tmp_path, **kw)
    with pytest.raises(ConfigError, match="'0.weight' has shape"):
        distbelief.train(mlp([10, 8, 2]), toy_data(), epochs=2, shards=2, replicas=2,
                         resume=tmp_path, **KW)  # fmt: skip


# ------------------------------------------------------------------ through the CLI

TINY = ("train", "digits", "--epochs", "1", "--replicas", "1", "--stages", "1", "--shards",
        "1", "--hidden", "16", "--seed", "7", "--no-run-dir")  # fmt: skip


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory written by ``distbelief train`` (tests copy it, then damage it)."""
    root = tmp_path_factory.mktemp("cli") / "ck"
    assert main([*TINY, "--checkpoint-dir", str(root), "--json"]) == 0
    return root


def damaged(cli_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "ck"
    shutil.copytree(cli_checkpoint, root)
    ckpt = checkpoint.checkpoints(root)[-1]
    return root, ckpt


def resume_fails(capsys: pytest.CaptureFixture[str], root: Path, *flags: str) -> str:
    capsys.readouterr()
    code = main(["train", "--resume", str(root), "--no-run-dir", *flags])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# Each kind of damage is refused by checkpoint.load (test_checkpoint.py); here, the command's
# side of it: exit 2 and one line naming the file, for a damaged shard and for a manifest that
# describes another model.
@pytest.mark.parametrize("case", ["corrupted", "other-model"])
def test_hostile_checkpoints_exit_2_with_one_line_naming_the_file(
    capsys: pytest.CaptureFixture[str], cli_checkpoint: Path, tmp_path: Path, case: str
) -> None:
    root, ckpt = damaged(cli_checkpoint, tmp_path)
    shard = ckpt / "shard0.safetensors"
    manifest = ckpt / checkpoint.MANIFEST
    if case == "corrupted":  # same size, one byte flipped: only the sha256 tells
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        named, what = shard, "sha256"
    else:  # the manifest of a different model (its flags say so too: the description wins)
        m = json.loads(manifest.read_text())
        m["parameters"][0]["shape"] = [32, 64]
        manifest.write_text(json.dumps(m))
        named, what = manifest, "does not match the model"
    err = resume_fails(capsys, root)
    assert str(named) in err and what in err, err


def test_resume_flags_must_agree_or_be_left_out(
    capsys: pytest.CaptureFixture[str], cli_checkpoint: Path, tmp_path: Path
) -> None:
    root, _ = damaged(cli_checkpoint, tmp_path)
    err = resume_fails(capsys, root, "--hidden", "32")
    assert err.startswith("distbelief: error: hidden:") and "'16'" in err
    err = resume_fails(capsys, root, "--shards", "2")
    assert err.startswith("distbelief: error: shards:")
    assert "does not exist" in resume_fails(capsys, tmp_path / "nowhere")


def test_resume_with_more_epochs_reports_where_it_resumed(
    capsys: pytest.CaptureFixture[str], cli_checkpoint: Path, tmp_path: Path
) -> None:
    root, ckpt = damaged(cli_checkpoint, tmp_path)
    update = checkpoint.load(ckpt).update
    capsys.readouterr()
    code = main(["train", "--resume", str(root), "--epochs", "2", "--no-run-dir", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["resumed_from_update"] == update and s["updates_lost"] == 0
    assert (s["seed"], s["hidden"], s["epochs"]) == (7, [16], 2)  # from the checkpoint
    assert s["examples"] == 1438  # the second epoch only
    assert s["last_checkpoint"] and checkpoint.load(root).update == s["updates_applied"]


# Run in a fresh Python as `distbelief train ARGS...`, but stopped (SIGSTOP) at the first
# progress note that counts updates past a written checkpoint: a kill there loses updates that
# were recorded, at the same point of the run every time (one replica, in-process: seeded).
STOP_PAST_A_CHECKPOINT = """
import os, signal, sys
from distbelief.storage import checkpoint
from distbelief.cli import main

checkpoint.PROGRESS_EVERY_S = 0.0  # note every progress report, not once a second
note = checkpoint.Checkpointer.note_progress

def note_then_stop(self, updates, *, force=False):
    note(self, updates, force=force)
    self.join()  # the checkpoint being written, if any, is on disk
    if self.written and updates > checkpoint.load(self.directory).update:
        os.kill(os.getpid(), signal.SIGSTOP)

checkpoint.Checkpointer.note_progress = note_then_stop
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run_bit_for_bit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # MNIST-1D's main job, made small; one replica in-process, so the resumed run must equal
    # an uninterrupted one bit for bit (the README's promise; several replicas on every
    # runtime are resumed in test_resume_on_every_runtime).
    flags = ["train", "--train-size", "3000", "--epochs", "6", "--replicas", "1", "--stages",
             "2", "--shards", "2", "--hidden", "64,64", "--seed", "11", "--no-run-dir"]  # fmt: skip
    root = tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, "-c", STOP_PAST_A_CHECKPOINT, *flags, "--checkpoint-dir", str(root),
         "--checkpoint-every", "100", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # (the suite's timeout bounds it)
        assert os.WIFSTOPPED(status), "the run ended without passing a checkpoint"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint.load(root).update
    noted = json.loads((root / checkpoint.PROGRESS).read_text())["updates_applied"]
    assert 0 < killed_at < noted < 6 * 94 * 2  # (94 mini-batches an epoch, 2 shards' updates)

    code = main(["train", "--resume", str(root), "--no-run-dir", "--json"])
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert main([*flags, "--checkpoint-dir", str(tmp_path / "full"), "--json"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["resumed_from_update"] == killed_at
    assert resumed["updates_lost"] == noted - killed_at  # what the progress note saw past it
    assert resumed["updates_applied"] == full["updates_applied"]
    assert torch.equal(checkpoint.load(root).weights, checkpoint.load(tmp_path / "full").weights)
    assert resumed["final_loss"] == full["final_loss"]
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert full["test_accuracy"] > 0.3  # it learned something: the comparison means something


def test_checkpoint_flags_that_cannot_work_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = main([*TINY, "--checkpoint-every", "5"]), capsys.readouterr().err
    assert code == 2 and err.startswith(
        "distbelief: error: checkpoint-every: give --checkpoint-dir"
    )
    code = main(["train", "digits", "--algorithm", "sandblaster", "--resume", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1  # no checkpoint there, or Sandblaster
    # a checkpoint written through the API records no flags of the command
    distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=1, checkpoint_dir=tmp_path, **KW)
    err = resume_fails(capsys, tmp_path)
    assert "records no flags of distbelief train" in err


def test_checkpoints_go_into_the_run_directory_by_default(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    flags = [a for a in TINY if a != "--no-run-dir"]
    assert main([*flags, "--checkpoint-every", "20", "--run-dir", str(tmp_path / "run")]) == 0
    ckpt = checkpoint.load(tmp_path / "run" / "checkpoints")
    assert ckpt.manifest["config"]["checkpoint_every"] == 20
    assert ckpt.manifest["config"]["meta"]["hidden"] == "16"  # the command's flags, for --resume


def test_the_master_asks_the_shards_only_after_every_position_and_mark() -> None:
    # The shards' states are taken only when every stage's mark has come back from every
    # shard: each travelled behind that stage's pushes, so the positions are not ahead.
    from distbelief.algorithms.downpour.master import DownpourMaster
    from distbelief.algorithms.downpour.messages import (
        CheckpointMarked,
        ConnectMaster,
        ShardStateReply,
    )

    told: list[tuple[Any, Any]] = []
    submitted: list[tuple] = []

    class Ctx:
        name, self_ref = "master", "master"

        def tell(self, ref: Any, message: Any) -> None:
            told.append((ref, message))

    class Writer:
        def submit(self, update: int, shards: Any, positions: Any, *, wait: bool) -> bool:
            submitted.append((update, positions, wait))
            return True

    master = DownpourMaster(1, 0, 100, None, 0, 10, checkpointer=Writer(), checkpoint_every=5,
                            checkpoint_marks=2)  # fmt: skip
    master.bind(Ctx())
    master.receive(ConnectMaster(("data0",), ("shard0", "shard1")), None)
    tag = master.checkpoints.start()
    assert told == [("data0", CheckpointRequest(tag))]
    master.receive(DataPosition(0, tag, 0, 4, 4, 40), "data0")
    master.receive(CheckpointMarked(tag, 0), "shard0")
    assert len(told) == 1  # one mark still on its way
    master.receive(CheckpointMarked(tag, 1), "shard1")
    assert told[1:] == [("shard0", CheckpointRequest(tag)), ("shard1", CheckpointRequest(tag))]
    for k in (0, 1):
        state = checkpoint.ShardState(k, torch.ones(2), None, {0: 3}, {"updates_applied": 3})
        master.receive(ShardStateReply(k, tag, state), f"shard{k}")
    assert submitted == [(6, {0: {"epoch": 0, "step": 4, "steps": 4, "examples": 40}}, False)]


def test_a_run_that_diverges_leaves_the_last_good_checkpoint(tmp_path: Path) -> None:
    sgd = {**KW, "optimizer": "sgd"}
    distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=1, checkpoint_dir=tmp_path, **sgd)
    good = checkpoint.load(tmp_path)
    with pytest.raises(distbelief.TrainingDiverged):
        distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=2, checkpoint_dir=tmp_path,
                         checkpoint_every=4, **{**sgd, "lr": 1e30})  # fmt: skip
    kept = checkpoint.load(tmp_path)  # whole, and the same one
    assert kept.path == good.path and torch.equal(kept.weights, good.weights)


def test_a_write_cut_off_by_a_kill_is_cleaned_up_by_the_next_run(tmp_path: Path) -> None:
    distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=1, checkpoint_dir=tmp_path, **KW)
    partial = tmp_path / ".tmp-cutoff"  # as a SIGKILL during a write leaves it (that it is
    partial.mkdir()  # never taken for a checkpoint: test_checkpoint.py)
    (partial / "shard0.safetensors").write_bytes(b"half")
    kw = {k: v for k, v in KW.items() if k != "seed"}
    distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=2, resume=tmp_path,
                     checkpoint_dir=tmp_path, **kw)  # fmt: skip
    assert not partial.exists() and checkpoint.load(tmp_path).update == 64


def test_updates_lost_counts_what_the_last_progress_note_saw_past_the_checkpoint(
    tmp_path: Path,
) -> None:
    distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=1, checkpoint_dir=tmp_path, **KW)
    ckpt = checkpoint.load(tmp_path)
    assert checkpoint.updates_lost(ckpt) == 0  # the run ended with its final checkpoint
    (tmp_path / checkpoint.PROGRESS).write_text(json.dumps({"updates_applied": ckpt.update + 7}))
    assert checkpoint.updates_lost(ckpt) == 7  # as a run killed 7 updates later left it
    (tmp_path / checkpoint.PROGRESS).unlink()
    assert checkpoint.updates_lost(ckpt) is None  # not recorded: unknown, not zero


def test_a_stage_restart_starts_a_waiting_checkpoint_again_under_a_new_tag() -> None:
    from distbelief.algorithms.downpour.master import DownpourMaster
    from distbelief.algorithms.downpour.messages import CheckpointMarked, ConnectMaster
    from distbelief.runtime.base import ActorRestarted

    told: list[tuple[Any, Any]] = []

    class Ctx:
        name, self_ref = "master", "master"

        def tell(self, ref: Any, message: Any) -> None:
            told.append((ref, message))

    master = DownpourMaster(1, 0, 100, None, 0, 10, checkpointer=object(), checkpoint_every=5,
                            checkpoint_marks=1)  # fmt: skip
    master.bind(Ctx())
    master.receive(ConnectMaster(("data0",), ("shard0",)), None)
    tag = master.checkpoints.start()
    master.receive(DataPosition(0, tag, 0, 4, 4, 40), "data0")
    told.clear()
    master.receive(ActorRestarted("replica0.stage0", "stage"), None)  # its mark is lost
    assert told == [("data0", ActorRestarted("replica0.stage0", "stage")),
                    ("data0", CheckpointRequest(tag + 1))]  # fmt: skip
    told.clear()
    master.receive(CheckpointMarked(tag, 0), "shard0")  # a mark of the old round: ignored
    master.receive(DataPosition(0, tag + 1, 0, 5, 5, 50), "data0")
    assert told == []
    master.receive(CheckpointMarked(tag + 1, 0), "shard0")
    assert told == [("shard0", CheckpointRequest(tag + 1))]


def test_checkpoints_carry_on_through_a_stage_restart(tmp_path: Path) -> None:
    result = distbelief.train(mlp([10, 16, 2]), toy_data(), epochs=2, replicas=2, stages=2,
                              checkpoint_dir=tmp_path, checkpoint_every=4, timeout_s=120,
                              runtime_options={"faults": ["kill:replica1.stage1@message=40"]},
                              **KW)  # fmt: skip
    assert result.stats["restarts"] == 1
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.update == result.stats["updates_applied_total"]
    assert torch.equal(ckpt.weights, flat(result.model))


def test_resume_on_another_runtime_leaves_the_old_runtimes_options_behind(
    capsys: pytest.CaptureFixture[str], cli_checkpoint: Path, tmp_path: Path
) -> None:
    root, ckpt = damaged(cli_checkpoint, tmp_path)
    manifest = ckpt / checkpoint.MANIFEST  # (not hashed: edited as a processes run's would be)
    m = json.loads(manifest.read_text())
    m["config"]["meta"].update(runtime="processes", shard_updates="hogwild")
    manifest.write_text(json.dumps(m))
    capsys.readouterr()
    code = main(["train", "--resume", str(root), "--runtime", "local", "--epochs", "2",
                 "--no-run-dir", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["runtime"] == "local"
