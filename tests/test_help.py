"""``--help`` reads well: paragraphs wrap to the terminal (no line breaks of their own), every
flag shows at 80 columns, and a flag that takes no value shows no type."""

from __future__ import annotations

import re

import pytest
import typer

from distbelief.cli import app, arrange_help, main

COMMANDS = ["", "train", "bench", "report", "experiment"]


def command_of(name: str):
    group = typer.main.get_command(app)
    arrange_help(group)
    return group if not name else group.commands[name]


def render(capsys: pytest.CaptureFixture[str], monkeypatch, name: str, columns: int) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    capsys.readouterr()
    assert main([*([name] if name else []), "--help"]) == 0
    return capsys.readouterr().out


def texts(name: str) -> list[str]:
    """Every paragraph the help shows: the command's, then each visible parameter's."""
    command = command_of(name)
    out = [p for p in (command.help or "").split("\n\n") if p]
    out += [p.help for p in command.params if p.help and not getattr(p, "hidden", False)]
    return out


@pytest.mark.parametrize("name", COMMANDS)
def test_no_paragraph_is_broken_at_200_columns(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    out = render(capsys, monkeypatch, name, 200)
    lines = out.splitlines()
    for text in texts(name):
        assert "\n" not in text, f"a line break inside {text[:40]!r}"
        head = text[:30]
        found = [line for line in lines if head in line]
        assert found, f"{head!r} not shown"
        line = found[0]
        start = line.index(head)
        end = line.rindex("│") if line.rstrip().endswith("│") else len(line) + 1
        room = end - start - 1  # the cell's (or the page's) width, less its padding
        shown = line[start:end].rstrip()
        if len(text) <= room:
            assert shown.startswith(text), f"broken though it fits in {room}: {shown!r}"
        else:  # broken by the width only: the next word would not have fitted
            next_word = text[len(shown) :].split()[0]
            assert len(shown) + 1 + len(next_word) > room, f"broken early: {shown!r}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_shows_at_80_columns_and_flags_show_no_type(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    out = render(capsys, monkeypatch, name, 80)
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "<bool>" not in out
    command = command_of(name)
    flags = [o for p in command.params if not getattr(p, "hidden", False) for o in p.opts]
    flags = [f for f in flags if f.startswith("-")] + ["--help"]
    for flag in flags:
        assert re.search(rf"(^|\s){re.escape(flag)}(\s|,|$)", out, re.M), f"{flag} not shown"


def test_train_groups_the_flags_most_used_first(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = render(capsys, monkeypatch, "train", 80)
    panels = re.findall(r"╭─ (.+?) ─", out)
    # then Other, for flags HELP_PANELS does not place
    groups = ["Arguments", "Model and data", "Algorithm", "Layout", "Runtime", "Output", "Faults"]
    assert panels[:7] == groups
    assert out.index("--model") < out.index("--epochs") < out.index("--replicas")
