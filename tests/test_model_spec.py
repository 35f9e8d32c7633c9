"""``distbelief train --model SPEC``: a model of the user's own from a file or a module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from support import run, run_json

pytestmark = pytest.mark.usefixtures("in_tmp_dir")  # files and run directories land there

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist1d_cnn.py"

# A model function that takes the data's widths, and a layer class of the file's own (which a
# Ray worker cannot import: it must travel by value).
MODEL_FILE = """
import torch
from torch import nn


class Halve(nn.Module):
    def forward(self, x):
        return x * 0.5


def make(in_features, out_features, hidden=32):
    assert (in_features, out_features) == ({inputs}, {outputs}), (in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, hidden), Halve(), nn.ReLU(),
                         nn.Linear(hidden, out_features))


fixed = [nn.Linear(64, 10)]  # a list of modules: the digits data's widths
number = 3
"""


def model_file(path: Path, inputs: int = 64, outputs: int = 10) -> Path:
    path.write_text(MODEL_FILE.format(inputs=inputs, outputs=outputs))
    return path


TINY_DIGITS = ("train", "digits", "--epochs", "2", "--replicas", "2", "--stages", "2",
               "--shards", "1", "--seed", "3", "--no-run-dir")  # fmt: skip


def test_a_function_of_the_data_widths_trains_on_a_csv(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Three classes in six features (the class is where the row's largest of the first three
    # features is): the model file asserts that it is handed 6 and 3, read from the CSV.
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 6, generator=g)
    y = x[:, :3].argmax(dim=1)
    rows = ["a,b,c,d,e,f,label"] + [
        ",".join(f"{v:.4f}" for v in row) + f",{int(c)}" for row, c in zip(x.tolist(), y)
    ]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    model_file(tmp_path / "net.py", inputs=6, outputs=3)
    s = run_json(capsys, "train", "--data", "rows.csv", "--test-split", "0.2",
                 "--model", "net.py:make", "--epochs", "8", "--seed", "1",
                 "--no-run-dir")  # fmt: skip
    assert s["model"] == "net.py:make" and s["task"] == "classify"
    assert s["test_accuracy"] > 0.8, s["test_accuracy"]  # chance is 1/3


def test_module_spec_list_of_modules_and_sandblaster(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # package.module:NAME from the working directory; NAME a list of modules; Sandblaster.
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    model_file(tmp_path / "mypkg" / "nets.py")
    s = run_json(capsys, "train", "digits", "--model", "mypkg.nets:fixed", "--algorithm",
                 "sandblaster", "--steps", "15", "--seed", "0", "--no-run-dir")  # fmt: skip
    assert s["model"] == "mypkg.nets:fixed" and s["parameters"] == 64 * 10 + 10
    assert s["test_accuracy"] > 0.8, s["test_accuracy"]


def bad(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("missing.py:make", "no file 'missing.py'"),
        ("net.py:nothing", "'net.py' defines no 'nothing'"),
        ("broken.py:make", "importing 'broken.py' raised ZeroDivisionError: division by zero"),
        ("net.py:number", "net.py:number is a int, not an nn.Sequential"),
        ("net.py:fixed", "net.py:fixed does not take the data's 40 input features"),
        ("no_such_module:make", "no module named 'no_such_module'"),
        ("net.py", "expected path/to/file.py:NAME or package.module:NAME"),
    ],
)
def test_bad_specs_exit_2_with_one_line_naming_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spec: str, expected: str
) -> None:
    model_file(tmp_path / "net.py")
    (tmp_path / "broken.py").write_text("import torch\n\nx = 1 / 0\n")
    # mnist1d (40 inputs) for all: net.py:fixed is a Linear(64, 10)
    err = bad(capsys, "train", "--model", spec, "--no-run-dir", "--epochs", "1")
    assert err.startswith("distbelief: error: model: ") and expected in err, err


def test_hidden_with_model_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model_file(tmp_path / "net.py")
    err = bad(capsys, *TINY_DIGITS, "--model", "net.py:make", "--hidden", "16")
    assert "hidden:" in err and "--model" in err, err


def test_resume_records_the_file_and_refuses_it_changed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    net = model_file(tmp_path / "net.py")
    ck = tmp_path / "ck"
    first = run_json(capsys, *TINY_DIGITS, "--model", "net.py:make", "--checkpoint-dir", str(ck))
    assert first["model"] == "net.py:make"
    net.write_text(net.read_text() + "\n# edited\n")
    err = bad(capsys, "train", "--resume", str(ck), "--epochs", "3", "--no-run-dir")
    assert "net.py changed since it was recorded" in err and "--model net.py:make" in err, err
    # given again explicitly: the edited file is used (same shapes, so the checkpoint fits)
    s = run_json(capsys, "train", "--resume", str(ck), "--epochs", "3", "--no-run-dir",
                 "--model", "net.py:make")  # fmt: skip
    assert s["model"] == "net.py:make" and s["resumed_from"] is not None
    assert s["examples"] == first["examples"] // 2  # this run: the third epoch only


def test_config_toml_of_a_run_reruns_the_same_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model_file(tmp_path / "net.py")
    argv = [a for a in TINY_DIGITS if a != "--no-run-dir"]
    first = run_json(capsys, *argv, "--model", "net.py:make", "--run-dir", "r1")
    config = (tmp_path / "r1" / "config.toml").read_text()
    assert 'model = "net.py:make"' in config and "model_sha256" in config
    again = run_json(capsys, "train", "--config", "r1/config.toml", "--no-run-dir")
    assert again["model"] == "net.py:make"
    assert again["test_accuracy"] == first["test_accuracy"]  # local runs are deterministic


@pytest.mark.skipif(not importlib.util.find_spec("ray"), reason="ray is not installed")
def test_a_layer_class_of_the_users_file_reaches_ray_workers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ray_session: None
) -> None:
    # Halve is defined in net.py, which the Ray workers cannot import: it travels by value
    # (without modelspec.ship_by_value the stages fail with ModuleNotFoundError). The run uses
    # the session's Ray instance.
    model_file(tmp_path / "net.py")
    s = run_json(capsys, *TINY_DIGITS, "--model", "net.py:make", "--runtime", "ray")
    assert s["runtime"] == "ray" and s["test_accuracy"] > 0.7, s["test_accuracy"]


@pytest.mark.slow
def test_the_cnn_example_is_a_model_spec(capsys: pytest.CaptureFixture[str]) -> None:
    # The README's example through the CLI (a slice of MNIST-1D, one epoch: the wiring only;
    # the full run's accuracy is in the README).
    s = run_json(capsys, "train", "--model", f"{EXAMPLE}:make_model", "--stages", "3",
                 "--lr", "0.02", "--train-size", "2000", "--epochs", "2", "--seed", "0",
                 "--no-run-dir")  # fmt: skip
    assert s["stages"] == 3 and s["examples"] == 4000
    assert s["test_accuracy"] > 0.25  # chance is 0.1; seed 0 reached 0.34
