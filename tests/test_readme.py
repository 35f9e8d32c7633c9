"""The README's quick start is what CI runs, and the code in the README and in ``docs/`` works:
every ``distbelief`` command of a ``bash`` block parses with the command's own parser (flag
names and value types), every ``python`` block compiles, the blocks marked
``<!-- check: run ... -->`` run, and every module path the pages name exists.

A runnable block is marked on the line before it, e.g. ``<!-- check: run with epochs=1 -->``:
the block runs as written, in a temporary directory, except that each ``NAME=VALUE`` after
``with`` replaces that keyword's value in every call (a short run of the same code)."""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE = ROOT / "src" / "distbelief"

ILLUSTRATIVE = {"FILE.py", "path/to/file.py"}
"""Module paths that stand for the reader's own file, not one of this repository's."""


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


# ------------------------------------------------------------------ the pages' code blocks


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    lang: str
    text: str
    check: str | None
    """The ``<!-- check: ... -->`` marker on the line before it, if any."""

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(
    r"(?:^<!--\s*check:\s*(?P<check>.*?)\s*-->\n)?^```(?P<lang>\w*)\n(?P<text>.*?)^```", re.M | re.S
)


def blocks(lang: str) -> list[Block]:
    """Every ``lang`` block of the README and the pages of docs/."""
    found = []
    for page in PAGES:
        source = page.read_text()
        for m in FENCE.finditer(source):
            if m["lang"] == lang:
                line = source.count("\n", 0, m.start("text")) + 1
                found.append(Block(page, line, lang, m["text"], m["check"]))
    return found


def commands() -> list[tuple[Block, list[str]]]:
    """Every ``distbelief ...`` command of a bash block, as its arguments after the program."""
    found = []
    for block in blocks("bash"):
        for line in block.text.splitlines():
            if "distbelief" not in line:  # e.g. ray start ... <this machine's address>
                continue
            words = shlex.split(line, comments=True)
            while words:  # one line may chain commands with &&
                head = words.index("&&") if "&&" in words else len(words)
                command, words = words[:head], words[head + 1 :]
                if command and Path(command[0]).name == "distbelief":
                    found.append((block, command[1:]))
    return found


def test_the_pages_have_code_to_check():
    # The checks below are only as good as what they find: the README alone has fifteen
    # commands and a runnable block.
    assert len(commands()) >= 30
    assert len(blocks("python")) >= 4
    assert sum(b.check is not None for b in blocks("python")) >= 2


@pytest.mark.parametrize(
    ("block", "args"), commands(), ids=lambda v: str(v) if isinstance(v, Block) else " ".join(v)
)
def test_command_parses(block: Block, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's own parser takes it: its subcommand, its flag names, their values' types.
    It is parsed, not run, and without the flags' callbacks (``--config`` and ``--resume`` read
    their files there), so no file it names need exist."""
    from click.exceptions import ClickException
    from typer.main import get_command

    from distbelief.cli import app

    group = get_command(app)
    subcommand, rest = args[0], args[1:]
    assert subcommand in group.commands, f"{block}: no subcommand {subcommand!r}"
    command = group.commands[subcommand]
    for param in command.params:
        monkeypatch.setattr(param, "callback", None)
    try:
        command.make_context(subcommand, rest)
    except ClickException as exc:
        pytest.fail(f"{block}: distbelief {shlex.join(args)}: {exc.format_message()}")


@pytest.mark.parametrize("block", blocks("python"), ids=str)
def test_python_block_compiles(block: Block) -> None:
    compile(block.text, str(block), "exec")


def shortened(block: Block) -> ast.Module:
    """The block with each ``NAME=VALUE`` of its marker's ``with`` put into every call."""
    check = block.check or ""
    assert re.fullmatch(r"run( with( \w+=\S+)+)?", check), f"{block}: unknown marker {check!r}"
    values = {
        name: ast.literal_eval(value)
        for name, value in re.findall(r"(\w+)=(\S+)", check.partition(" with ")[2])
    }
    tree = ast.parse(block.text)
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg in values:
                    keyword.value = ast.Constant(values[keyword.arg])
                    used.add(keyword.arg)
    assert used == set(values), f"{block}: the marker names {sorted(set(values) - used)}, unused"
    return ast.fix_missing_locations(tree)


@pytest.mark.parametrize("block", [b for b in blocks("python") if b.check], ids=str)
def test_runnable_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The block runs, shortened as its marker says, in an empty directory; ``mnist1d()``
    generates 1,000 examples instead of 10,000 (generating those takes 6 s of CPU)."""
    import distbelief.data
    from distbelief.data import inputs

    generate = inputs.mnist1d

    def mnist1d(num_samples: int = 1000, seed: int = 42) -> object:
        return generate(num_samples, seed)

    for where in (distbelief.data, inputs):  # the public name, and where the package takes it
        monkeypatch.setattr(where, "mnist1d", mnist1d)
    monkeypatch.chdir(tmp_path)
    exec(compile(shortened(block), str(block), "exec"), {"__name__": "__readme__"})


def module_paths() -> list[tuple[Path, str]]:
    """Every ``something.py`` path a page names (in text or in a block)."""
    found = []
    for page in PAGES:
        for m in re.finditer(r"(?<![\w./<>-])((?:[\w.-]+/)*[\w-]+\.py)\b", page.read_text()):
            found.append((page, m[1]))
    return sorted(set(found))


def test_named_module_paths_exist():
    """A path is the repository's (``tests/...``, ``benchmarks/...``), the package's
    (``algorithms/downpour/stage.py``), or a file name found in the package (``lbfgs.py``)."""
    missing = []
    for page, path in module_paths():
        if path in ILLUSTRATIVE:
            continue
        if (ROOT / path).exists() or (PACKAGE / path).exists():
            continue
        if "/" not in path and any(PACKAGE.rglob(path)):
            continue
        missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "no such module: " + ", ".join(missing)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve():
    """Every relative link of the README and docs/ names a file that exists, and its
    ``#anchor``, if any, a heading of that file."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif fragment and file.suffix == ".md":
                text = FENCE.sub("", file.read_text())  # a "# comment" in a block is no heading
                headings = re.findall(r"^#+ (.*)$", text, flags=re.M)
                if fragment not in {anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "broken links: " + ", ".join(broken)
