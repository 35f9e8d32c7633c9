"""The command's interface is kept: flag names, the keys of a ``--json`` run and the run
directory's format compared with ``tests/data/interface.json``, recorded before the restructure
of issue 17 (by ``tests/record_interface.py``). Keys may be added, only those named here; none
may go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from record_interface import RUNS, SUBCOMMANDS, flags, json_keys, run_dir_format

RECORDED = json.loads((Path(__file__).parent / "data" / "interface.json").read_text())

ADDED = {
    # issue 17: the summary and the JSON say how many updates the shards applied
    "json_keys/downpour": {"shard_updates"},
    # issue 25: an earlier run's calibrated cluster, for the same simulated numbers again
    "flags/experiment": {"--cluster"},
}


def _compare(where: str, recorded: list[str], live: list[str]) -> None:
    missing = sorted(set(recorded) - set(live))
    added = sorted(set(live) - set(recorded) - ADDED.get(where, set()))
    assert not missing, f"{where}: gone since the recording: {missing}"
    assert not added, f"{where}: new, not named in ADDED: {added}"


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_flags_are_kept(subcommand: str) -> None:
    _compare(f"flags/{subcommand}", RECORDED["flags"][subcommand], flags(subcommand))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(RUNS))
def test_json_keys_are_kept(algorithm: str) -> None:
    _compare(f"json_keys/{algorithm}", RECORDED["json_keys"][algorithm], json_keys(RUNS[algorithm]))


@pytest.mark.slow
def test_run_directory_format_is_kept() -> None:
    live = run_dir_format()
    assert sorted(live) == sorted(RECORDED["run_dir"])
    for part, recorded in RECORDED["run_dir"].items():
        _compare(f"run_dir/{part}", recorded, live[part])
