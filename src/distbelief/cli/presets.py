"""The preset datasets (each with its MLP, and each algorithm's settings for it, which the
algorithm declares beside its configuration), a data file's preset, and the model a run
trains."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import algorithms
from .. import models as modelspec
from ..data import inputs as datasets
from ..data.formats import CLASSIFY, TASKS, DataFileError, FileData, scan
from ..models import mlp
from .app import UsageFailure, seam


@dataclass(frozen=True)
class Preset:
    """A dataset with the model shape that trains it well; each algorithm's settings for it
    are its configuration's ``PRESETS[like]``."""

    load: Callable[[int], tuple[datasets.Data, datasets.Data]]
    """Maps the run's seed to ``(train, test)`` data."""
    inputs: int
    """Input width of the MLP."""
    outputs: int
    """Output width of the MLP."""
    hidden: tuple[int, ...]
    """Hidden layer widths."""
    activation: type[nn.Module]
    """Activation after every hidden layer."""
    output_activation: type[nn.Module] | None
    """Activation after the output layer (None: raw logits)."""
    loss: str
    """Loss name understood by ``distbelief.train``."""
    like: str
    """Whose settings it takes from each algorithm's presets (a data file: digits')."""
    truth_table: bool = False
    """Whether the summary shows the trained model's output on every test input."""

    def settings(self, algorithm: str) -> dict[str, Any]:
        """The algorithm's settings for this dataset (the command's defaults)."""
        return dict(algorithms.get(algorithm).config.PRESETS.get(self.like, {}))


def _mnist1d(seed: int) -> tuple[datasets.Data, datasets.Data]:
    # MNIST-1D's own seed (42) fixes the dataset, as in its paper; the run's seed varies the
    # model and the data order only.
    return _mnist1d_once()


@functools.cache
def _mnist1d_once() -> tuple[datasets.Data, datasets.Data]:
    return datasets.mnist1d()  # generating it takes seconds: once per process


def _xor(seed: int) -> tuple[datasets.Data, datasets.Data]:
    # The seed's 50,000 random rows of the XOR truth table; the test set is the table itself.
    return datasets.xor(num_samples=50_000, seed=seed)


def _digits(seed: int) -> tuple[datasets.Data, datasets.Data]:
    return datasets.digits()


# fmt: off
PRESETS: dict[str, Preset] = {
    # The main job: MNIST-1D, an MLP 40-256-256-10.
    "mnist1d": Preset(
        load=_mnist1d, inputs=40, outputs=10, hidden=(256, 256), activation=nn.ReLU,
        output_activation=None, loss="cross_entropy", like="mnist1d",
    ),
    # The seed's example: layers 2-2-1 with sigmoid, squared error.
    "xor": Preset(
        load=_xor, inputs=2, outputs=1, hidden=(2,), activation=nn.Sigmoid,
        output_activation=nn.Sigmoid, loss="mse", like="xor", truth_table=True,
    ),
    # scikit-learn's 8x8 digits (1,438 training images).
    "digits": Preset(
        load=_digits, inputs=64, outputs=10, hidden=(128, 128), activation=nn.ReLU,
        output_activation=None, loss="cross_entropy", like="digits",
    ),
}
# fmt: on

FILE_HIDDEN = (128, 128)
"""The MLP of a ``--data FILE`` run: the digits preset's (two hidden layers of 128), whose
settings it takes too (Downpour: Adagrad at the shards with gamma 0.05, batch 32, 20 epochs,
4 replicas x 2 stages, 2 shards), which train small tabular data well; every flag overrides
them."""


def preset_help(name: str) -> str:
    """Each preset's value of the default algorithm's setting ``name``, for --help:
    ``mnist1d 15, xor 1, digits 20``."""
    default = algorithms.names()[0]
    return ", ".join(f"{d} {p.settings(default)[name]:g}" for d, p in PRESETS.items())


def file_preset(
    data: str,
    target: str | None,
    test_data: str | None,
    test_split: float | None,
    task: str | None,
) -> tuple[Preset, FileData, FileData | None]:
    """A preset for a data file: the MLP's widths come from the file, the loss from the task
    (classify: cross-entropy over the labels; regress: mse). Each file is checked here, in one
    streaming pass; a bad one is a usage error naming the file and where."""
    if task is not None and task not in TASKS:
        raise UsageFailure(f"task: must be {' or '.join(TASKS)}, got {task!r}")
    if test_data is not None and test_split is not None:
        raise UsageFailure("test-split: give --test-data or --test-split, not both")
    try:
        train_rows = scan(data, target, task)
    except DataFileError as exc:
        raise UsageFailure(f"data: {exc}") from None
    test_rows = None
    if test_split is not None:
        try:
            train_rows, test_rows = train_rows.split(test_split)
        except DataFileError as exc:
            raise UsageFailure(f"test-split: {exc}") from None
    elif test_data is not None:
        try:
            # the training file's target, task and columns (by name, in its order)
            test_rows = scan(test_data, like=train_rows)
        except DataFileError as exc:
            raise UsageFailure(f"test-data: {exc}") from None
        if test_rows.width != train_rows.width:
            raise UsageFailure(
                f"test-data: {test_rows.path} has {test_rows.width} features per example but "
                f"the training data ({train_rows.path}) has {train_rows.width}"
            )
    classify = train_rows.task == CLASSIFY
    outputs = max(train_rows.outputs, test_rows.outputs if test_rows else 0)
    preset = Preset(
        load=lambda seed: (train_rows, test_rows),  # type: ignore[arg-type,return-value]
        inputs=train_rows.width, outputs=outputs, hidden=FILE_HIDDEN, activation=nn.ReLU,
        output_activation=None, loss="cross_entropy" if classify else "mse", like="digits",
    )  # fmt: skip
    return preset, train_rows, test_rows


def task_line(rows: FileData) -> str:
    """One line: the task of a data file, why, and the flag that changes it."""
    if rows.task_reason == "given":
        return f"task {rows.task} (given)"
    other = "regress" if rows.task == CLASSIFY else "classify"
    what = "fit the labels as numbers" if other == "regress" else "take the labels as classes"
    return f"task {rows.task}, inferred: {rows.task_reason} (--task {other} to {what})"


def build_mlp(preset: Preset, hidden: Sequence[int], seed: int) -> nn.Sequential:
    """The preset's MLP with the given hidden widths, initialised from ``seed``."""
    widths = [preset.inputs, *hidden, preset.outputs]
    return mlp(widths, preset.activation, preset.output_activation, seed)


def build_model(
    preset: Preset, hidden: Sequence[int], seed: int, spec: modelspec.ModelSpec | None
) -> nn.Sequential:
    """The run's model: the ``--model`` spec's (checked against the data's input width) or
    the preset's MLP."""
    if spec is None:
        return build_mlp(preset, hidden, seed)
    model = modelspec.build(spec, preset.inputs, preset.outputs, seed)
    modelspec.check_input_width(spec, model, preset.inputs)
    return model


def parse_hidden(text: str) -> tuple[int, ...]:
    """``"256,256"`` -> ``(256, 256)``; an empty string means no hidden layer."""
    if not text.strip():
        return ()
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise UsageFailure(
            f"hidden: expected positive integer widths separated by commas, e.g. 256,256; "
            f"got {text!r}"
        )
    return widths


def check_model_fits(preset: Preset, hidden: Sequence[int]) -> None:
    """An MLP too large to build in this machine's memory is an argument error, not a failed
    allocation: count its parameters before making it (float32, 4 bytes each)."""
    widths = [preset.inputs, *hidden, preset.outputs]
    params = sum(a * b + b for a, b in zip(widths, widths[1:]))
    free = seam("available_memory")()
    if free is not None and params * 4 > free:
        raise UsageFailure(
            f"hidden: an MLP {'-'.join(map(str, widths))} has {params:,} parameters "
            f"({params * 4 / 2**30:.1f} GiB), more than the {free / 2**30:.1f} GiB of memory "
            f"available"
        )
