"""Record the command's interface: every subcommand's flag names and the keys of a ``--json``
run of each algorithm (nested keys joined by dots). ``test_interface.py`` compares the live
interface with ``tests/data/interface.json``, recorded before the restructure (issue 17).

Run ``python tests/record_interface.py > tests/data/interface.json`` only when a flag or key
is meant to change, and say so in the commit."""

from __future__ import annotations

import json
import re
import sys
import tempfile
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from distbelief.cli import app

SUBCOMMANDS = ("train", "bench", "report", "experiment")
RUNS = {
    "downpour": ["train", "--epochs", "1", "--replicas", "2", "--no-run-dir", "--json"],
    "sandblaster": [
        "train",
        "--algorithm",
        "sandblaster",
        "--steps",
        "2",
        "--no-run-dir",
        "--json",
    ],
}


def flags(subcommand: str) -> list[str]:
    """The long flag names ``distbelief SUBCOMMAND --help`` lists."""
    out = CliRunner().invoke(app, [subcommand, "--help"], env={"COLUMNS": "200"}).output
    return sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out)))


def keys(obj: object, prefix: str = "") -> list[str]:
    """Every key of a JSON object, nested ones as ``outer.inner`` (lists: their first item)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found.append(prefix + k)
            found += keys(v, prefix + k + ".")
    elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
        found += keys(obj[0], prefix)
    return found


def json_keys(args: list[str]) -> list[str]:
    """The keys of the JSON line a ``--json`` run prints last."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return sorted(set(keys(json.loads(result.output.strip().splitlines()[-1]))))


def run_dir_format() -> dict[str, list[str]]:
    """What a Downpour run directory holds: its files (TensorBoard's names, which carry a time
    and host, as one pattern), the keys of ``config.toml`` and, per ``kind``, of the lines of
    ``metrics.jsonl``."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        args = ["train", "--epochs", "1", "--replicas", "2", "--run-dir", str(run), "--quiet"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        files = sorted(
            "events.out.tfevents.*"
            if p.name.startswith("events.out.tfevents.")
            else p.relative_to(run).as_posix()
            for p in run.rglob("*")
            if p.is_file()
        )
        config = keys(tomllib.loads((run / "config.toml").read_text()))
        lines: dict[str, set[str]] = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            obj = json.loads(line)
            lines.setdefault(obj["kind"], set()).update(keys(obj))
    return {
        "files": files,
        "config.toml": sorted(config),
        **{f"metrics.jsonl:{kind}": sorted(k) for kind, k in lines.items()},
    }


def record() -> dict[str, object]:
    """The interface as recorded in ``tests/data/interface.json``."""
    return {
        "flags": {name: flags(name) for name in SUBCOMMANDS},
        "json_keys": {name: json_keys(args) for name, args in RUNS.items()},
        "run_dir": run_dir_format(),
    }


if __name__ == "__main__":
    json.dump(record(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
