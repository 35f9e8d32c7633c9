"""The README's quick start is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    setup_and_train, setup_and_test = commands
    assert setup_and_train.endswith("distbelief train")
    assert "-c constraints.txt" in setup_and_train and "-c constraints.txt" in setup_and_test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_and_test in ci, "CI must run the README's test command verbatim"


def test_constraints_pin_the_cpu_torch_on_disk_and_ray():
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", pins, flags=re.M)
    assert re.search(r"^ray==2\.60\.\*$", pins, flags=re.M)
