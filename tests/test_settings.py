"""Each setting is declared once (``distbelief.settings``): the configurations' checks, the
command's flags, its resume policy and its presets derive from the declarations, and agree
with what the command did before they were derived (issue 17)."""

from __future__ import annotations

import math

import pytest
import typer

from distbelief import ConfigError, algorithms, cli
from distbelief.algorithms.downpour.config import DownpourConfig
from distbelief.algorithms.sandblaster.config import SandblasterConfig
from distbelief.cli import options
from distbelief.settings import MAX_SEED, declared, must_agree


@pytest.mark.parametrize(
    "config", [lambda **kw: DownpourConfig(0.1, 8, 1, **kw), SandblasterConfig]
)
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(timeout_s=math.inf), r"^timeout_s: must be a finite number > 0, got inf$"),
        (dict(timeout_s=0), r"^timeout_s: must be a finite number > 0, got 0$"),
        (dict(seed=MAX_SEED + 1), r"^seed: must be an integer from 0 to 2\*\*63 - 1 or None"),
        (dict(seed=-1), r"^seed: must be an integer from 0 to 2\*\*63 - 1 or None, got -1$"),
        (dict(replicas=0), r"^replicas: must be an integer >= 1, got 0$"),
        (dict(runtime="mpi"), r"^runtime: unknown runtime 'mpi'; choose one of local, "),
        (dict(checkpoint_every=3), r"^checkpoint_every: checkpoints need a checkpoint_dir$"),
        (dict(stages=0), r"^stages: must be >= 1, got 0$"),
        (dict(stages="2"), r"^stages: expected a count or split points, got '2'$"),
    ],
)  # fmt: skip
def test_shared_settings_are_checked_alike_by_every_algorithm(config, bad, match):
    with pytest.raises(ConfigError, match=match):
        config(**bad)


def test_the_largest_seed_is_taken_by_both():
    assert DownpourConfig(0.1, 8, 1, seed=MAX_SEED).seed == SandblasterConfig(seed=MAX_SEED).seed


def test_the_resume_policy_is_derived_as_it_was_listed():
    # The lists the command kept by hand before the declarations (cli.py, 329df65).
    assert options.NOT_RECORDED == {
        "config", "as_json", "quiet", "run_dir", "no_run_dir", "checkpoint_dir", "resume"
    }  # fmt: skip
    # (and since then --cluster, the simulated runtime's option, which goes with the runtime)
    assert options.NOT_DEFAULT_ON_RESUME == {"inject", "address", "shard_updates", "cluster"}
    assert options.MAY_DIFFER_ON_RESUME == {
        "epochs", "steps", "runtime", "address", "shard_updates", "eval_every", "torch_threads",
        "inject", "checkpoint_every", "model_sha256", "cluster",
    }  # fmt: skip
    filled = {k for k, s in options.SETTINGS.items() if s.preset}
    assert filled == {"lr", "batch_size", "epochs", "stages", "replicas", "shards", "optimizer",
                      "seed", "steps", "history"}  # fmt: skip
    # and the drivers' (algorithms/*/driver.py MUST_AGREE), as sets
    assert set(must_agree(DownpourConfig)) == {
        "batch_size",
        "optimizer",
        "lr",
        "seed",
        "partitions",
    }
    assert set(must_agree(SandblasterConfig)) == {"history", "batch_size", "seed"}


def test_every_flag_is_in_a_help_panel():
    placed = {name for names in cli.HELP_PANELS.values() for name in names}
    loose = set(options.SETTINGS) - placed - set(options.ARGUMENTS) - set(options.HIDDEN)
    assert not loose, f"flags in no panel of HELP_PANELS: {sorted(loose)}"
    assert placed <= set(options.SETTINGS), placed - set(options.SETTINGS)


@pytest.mark.parametrize("name", algorithms.names())
def test_presets_set_only_settings_declared_part_of_a_preset(name):
    config = algorithms.get(name).config
    preset = {k for k, s in declared(config).items() if s.preset}
    for dataset, values in config.PRESETS.items():
        assert dataset in cli.PRESETS
        assert set(values) <= preset, (dataset, set(values) - preset)
        config(**values)  # a valid configuration


def test_summary_keys_of_settings_are_declared_shown():
    keys = {k for k, s in declared(DownpourConfig).items() if s.shown}
    assert {"n_fetch", "n_push", "lr", "stages", "eval_every", "seed"} <= keys
    shown = {s.shown for s in declared(SandblasterConfig).values() if isinstance(s.shown, str)}
    assert shown == {"steps_max"}


def test_train_has_a_flag_for_every_declared_flag_and_none_other():
    command = typer.main.get_command(cli.app).commands["train"]
    params = {p.name for p in command.params}
    for name in algorithms.names():
        for key, s in declared(algorithms.get(name).config).items():
            assert (key in params) == s.flag, key
    assert params == set(options.SETTINGS)
