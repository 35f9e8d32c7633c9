"""Every bad input fails before any actor starts, with a message naming the parameter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import RUNTIMES, mlp
from torch import nn

import distbelief
from distbelief import ConfigError
from distbelief.runtime.local import LocalRuntime


def data(n=32, features=10, classes=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


BASE = dict(loss="cross_entropy", lr=0.1, batch_size=8, epochs=1)


class SpawnSpy(LocalRuntime):
    """A local runtime that records the actors spawned into it."""

    def __init__(self) -> None:
        super().__init__(0)
        self.spawned: list[str] = []

    def spawn(self, name, cls, *args, **kwargs):
        self.spawned.append(name)
        return super().spawn(name, cls, *args, **kwargs)


def check(match: str, model=None, train_data=None, **overrides):
    """``train`` refuses the input with ``match`` before any actor starts: the runtime passed
    in (unless ``overrides`` name another) has had nothing spawned into it."""
    spy = SpawnSpy()
    kw = {**BASE, "runtime": spy, **overrides}
    with pytest.raises(ConfigError, match=match):
        distbelief.train(
            model if model is not None else mlp([10, 8, 3]),
            train_data if train_data is not None else data(),
            **kw,
        )
    assert spy.spawned == [], f"{spy.spawned[0]} was spawned before the input was refused"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(stages=4), r"^stages: 4 stages but the model has only 3 layers"),
        (dict(stages=0), r"^stages: must be >= 1"),
        (dict(replicas=33), r"^replicas: 33 replicas but only 32 training examples"),
        (dict(replicas=0), r"^replicas: must be an integer >= 1"),
        (dict(shards=200), r"^shards: 200 shards but the model has 115 parameters"),
        (dict(n_fetch=0), r"^n_fetch: must be an integer >= 1"),
        (dict(n_push=0), r"^n_push: must be an integer >= 1"),
        (dict(batch_size=0), r"^batch_size: must be an integer >= 1"),
        (dict(epochs=-1), r"^epochs: must be an integer >= 1"),
        (dict(lr=0.0), r"^lr: must be a finite number > 0"),
        (dict(lr=float("nan")), r"^lr: must be a finite number > 0"),
        (dict(warmstart_steps=-1), r"^warmstart_steps: must be an integer >= 0"),
        (dict(optimizer="rmsprop"), r"^optimizer: unknown optimizer 'rmsprop'"),
        (dict(runtime="mpi"), r"^runtime: unknown runtime 'mpi'"),
        (dict(loss="hinge"), r"^loss: unknown loss 'hinge'"),
        (dict(seed=-3), r"^seed: must be an integer from 0 to 2\*\*63 - 1"),
        (dict(seed=2**70), r"^seed: must be an integer from 0 to 2\*\*63 - 1 or None, got 1180"),
        (dict(batch_size=np.int64(0)), r"^batch_size: must be an integer >= 1, got 0$"),
        (dict(lr=1e300), r"^lr: 1e\+300 overflows the model's float32"),
    ],
)
def test_bad_settings_name_the_parameter(overrides, match):
    check(match, **overrides)


def test_stages_whose_shapes_do_not_chain_are_found_by_a_dry_run():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(7, 3))
    check(
        r"^model: layer 2 \(Linear\) in stage 1 cannot take the output of layer 1 "
        r"\(shape \(2, 8\)\)",
        model=model,
        stages=2,
    )


def test_inputs_that_do_not_fit_the_first_layer_are_named():
    check(
        r"^model: layer 0 \(Linear\) in stage 0 cannot take the inputs of train_data "
        r"\(each shaped \(11,\)\)",
        train_data=data(features=11),
    )
    check(
        r"^model: layer 0 \(Linear\) in stage 0 cannot take the inputs of eval_data "
        r"\(each shaped \(12,\)\)",
        eval_data=data(features=12),
    )


def test_numpy_scalars_are_numbers_like_any_other():
    numpy_settings = dict(lr=np.float64(0.1), batch_size=np.int64(8), epochs=np.int32(1))
    result = distbelief.train(
        mlp([10, 8, 3]), data(), **{**BASE, **numpy_settings}, seed=np.int64(4)
    )
    assert result.config.batch_size == 8 and type(result.config.batch_size) is int
    assert type(result.config.lr) is float and result.stats["seed"] == 4


def test_an_embedding_index_out_of_range_anywhere_is_named():
    model = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(12, 3))
    x = torch.randint(0, 50, (32, 3), generator=torch.Generator().manual_seed(0))
    _, y = data()
    x[17, 2] = 50
    check(r"^train_data: row 17 holds index 50, out of range for the first layer, Embedding "
          r"of 50 entries", model=model, train_data=(x, y))  # fmt: skip
    x[17, 2] = 0
    bad = x.clone()
    bad[3, 0] = -1
    check(r"^eval_data: row 3 holds index -1", model=model, train_data=(x, y), eval_data=(bad, y))


def test_batchnorm_never_meets_a_mini_batch_of_one():
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    check(
        r"^batch_size: replica 1's 17 examples end each epoch with a mini-batch of one",
        model=model,
        train_data=data(n=33),
        replicas=2,
    )


def test_a_model_too_large_for_memory_is_refused_before_anything_is_copied(monkeypatch):
    monkeypatch.setattr(distbelief.checks, "available_memory", lambda: 1000)
    check(r"^model: 115 parameters need about .* more than the 0.0 GiB", replicas=1)


# On Ray (messages decoded in each actor's process) the split whose two stages both begin with
# the in-place layer.
@pytest.mark.parametrize(
    "runtime, split",
    [
        pytest.param(rt, split, id=f"{rt}-{name}")
        for rt in RUNTIMES
        for split, name in [([1], "stage0"), ([2], "stage1")]
        if rt != "ray" or split == [2]
    ],
    indirect=["runtime"],
)
def test_a_layer_working_in_place_first_in_a_stage_trains_and_leaves_the_data_alone(runtime, split):
    # ReLU(inplace=True) first in stage 1 (after split [1]) once failed on the leaf autograd
    # made of its input; first in the model (split [2]: stage 0 = Linear, stage 1 = ReLU...)
    # it must not edit the data shard's mini-batches either.
    layers = [nn.ReLU(inplace=True), nn.Linear(10, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)]
    x, y = data()
    before = x.clone()
    result = distbelief.train(
        nn.Sequential(*layers), (x, y), **BASE, stages=split, eval_data=(x, y), runtime=runtime
    )
    assert torch.equal(x, before)
    with_parameters = 1 if split == [1] else 2  # split [1]: stage 0 is the ReLU alone
    assert result.stats["updates_applied_total"] == 4 * with_parameters


def test_labels_out_of_range_for_cross_entropy():
    x, y = data()
    y[5] = 3
    check(
        r"^train_data: row 5: label 3 is out of range for cross_entropy over the model's 3 "
        "outputs",
        train_data=(x, y),
    )
    y[5] = -1
    y[2] = -1  # the first bad row is named
    check(r"^train_data: row 2: label -1 is out of range", train_data=(x, y))


def test_eval_labels_out_of_range_are_named_too():
    x, y = data()
    y[0] = 9
    check(r"^eval_data: row 0: label 9 is out of range", eval_data=(x, y))


def test_float_labels_for_cross_entropy_are_rejected():
    x, y = data()
    check(r"^train_data: cross_entropy needs integer class labels", train_data=(x, y.float()))


def test_mse_targets_must_match_the_output_shape():
    x, _ = data()
    check(
        r"^train_data: mse needs targets shaped like the output",
        loss="mse",
        train_data=(x, torch.zeros(32, 2)),
    )


@pytest.mark.parametrize(
    "train_data, match",
    [
        ((torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)), r"^train_data: the data is empty"),
        ((torch.zeros(4, 10), torch.zeros(5, dtype=torch.long)), r"^train_data: 4 inputs but 5"),
        ("not data", r"^train_data: expected an \(inputs, targets\) pair or a torch Dataset"),
        (
            torch.utils.data.TensorDataset(torch.zeros(0, 10), torch.zeros(0)),
            r"^train_data: the dataset is empty",
        ),
    ],
)
def test_bad_data_is_named(train_data, match):
    check(match, train_data=train_data)


def test_bad_models_are_named():
    check(r"^model: expected an nn.Sequential or a list", model=nn.Linear(10, 3))
    check(r"^model: the model has no parameters", model=nn.Sequential(nn.ReLU()))
    mixed = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 3).double())
    check(r"^model: parameters have mixed dtypes", model=mixed)
    check(r"^model: the model has no layers", model=[])


def test_a_model_with_nothing_to_train_is_named():
    model = mlp([10, 8, 3])
    for p in model.parameters():
        p.requires_grad_(False)
    check("^model: no parameter requires grad", model=model)


def test_a_list_of_modules_is_a_model():
    result = distbelief.train([nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)], data(), **BASE)
    assert isinstance(result.model, nn.Sequential) and len(result.model) == 3


def test_a_custom_loss_must_return_a_scalar():
    check(r"^loss: must return a scalar tensor", loss=lambda out, t: out.sum(dim=1))


def test_nan_or_inf_in_the_data_is_refused_naming_the_first_row():
    x, y = data()
    x[9, 4], x[20, 0] = float("inf"), float("nan")
    check(
        r"^train_data: row 9 of the inputs holds inf \(2 rows hold NaN or Inf\)", train_data=(x, y)
    )
    targets = torch.zeros(32, 3)
    targets[30, 1] = float("nan")
    check(
        r"^eval_data: row 30 of the targets holds nan",
        loss="mse",
        train_data=(data()[0], torch.zeros(32, 3)),
        eval_data=(data()[0], targets),
    )


def test_a_runtime_passed_in_is_a_runtime_named_as_one_of_the_known_ones():
    check(r"^runtime: unknown runtime <object object", runtime=object())

    class Unnamed(LocalRuntime):
        name = "mpi"

    check(r"^runtime: a Unnamed instance must name one of local, processes, ray", runtime=Unnamed())


def test_a_runtime_passed_in_has_its_options_already():
    # They are given when creating it; the algorithm's own options are still the run's.
    check(
        r"^runtime_options: faults, max_restarts: options of the runtime, which was passed in",
        runtime_options={"faults": ["kill:shard0@update=1"], "max_restarts": 1},
    )
