"""The package's import layering, enforced: no module imports from a layer above its own, the
algorithm packages do not import each other, and no two modules import each other (directly or
round a longer loop). Imports are read with ``ast`` (nothing is imported); relative imports are
resolved, and an import inside a function (a lazy import) counts as much as one at the top: it
is still a dependency, only a later one.

The layer table below is the one place the layering is written down (docs/architecture.md
copies it). A new module must find its place in it: a module the table does not name fails.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "distbelief"

LAYERS: list[tuple[str, ...]] = [
    # Bottom to top. A name covers the module of that name and everything under it; the longest
    # name that matches a module decides its layer. "algorithms.*" is every algorithm package
    # (algorithms.downpour, algorithms.sandblaster, ...): one layer, and none imports another.
    ("errors", "settings"),
    ("results", "core", "models", "nn"),
    ("data", "storage"),
    ("runtime",),
    ("evaluate",),
    # What every algorithm shares: the registry, the driver's messages, the driver skeleton.
    ("algorithms.registry", "algorithms.messages", "algorithms.driver"),
    ("algorithms.*",),
    # The algorithms package itself imports each algorithm, so that it registers.
    ("algorithms",),
    ("checks", "api"),
    ("cli", "bench", "report", "experiments", "__init__", "__main__"),
]
"""The layers, bottom to top: a module may import only from its own layer or one below."""

ANY_ALGORITHM = "algorithms.*"


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name relative to it (the package's
    own ``__init__`` is ``"__init__"``, a subpackage's is the subpackage's name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(root: Path, package: str) -> dict[str, set[str]]:
    """Which of the package's modules each of its modules imports (anywhere in its body).

    ``package`` is the package's importable name (its absolute imports start with it). ``from X
    import n`` is an import of module ``X.n`` when that is a module, else of ``X``."""
    known = modules(root)

    def resolve(name: str) -> str | None:
        """The longest known module that dotted ``name`` (relative to the package) names."""
        parts = name.split(".") if name else []
        while parts:
            if ".".join(parts) in known:
                return ".".join(parts)
            parts.pop()
        return "__init__"

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        here = [] if name == "__init__" else name.split(".")
        base = here if is_package else here[:-1]  # the package relative imports start from
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top, _, rest = alias.name.partition(".")
                    if top == package:
                        targets.add(resolve(rest))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    if node.level - 1 > len(base):
                        raise ValueError(f"{path}: relative import beyond the package")
                    start = base[: len(base) - (node.level - 1)]
                    source = ".".join(start + ([node.module] if node.module else []))
                else:
                    top, _, rest = (node.module or "").partition(".")
                    if top != package:
                        continue
                    source = rest
                for alias in node.names:
                    full = f"{source}.{alias.name}" if source else alias.name
                    targets.add(full if full in known else resolve(source))
        targets.discard(name)
        graph[name] = targets
    return graph


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, table entry) of ``module``, or None if the table does not place it."""
    best: tuple[int, int, str] | None = None  # (length of the match, layer, entry)
    parts = module.split(".")
    for layer, names in enumerate(LAYERS):
        for entry in names:
            if entry == ANY_ALGORITHM:
                if len(parts) >= 2 and parts[0] == "algorithms":
                    match, key = 1.5, f"algorithms.{parts[1]}"  # below any exact entry's 2
                else:
                    continue
            else:
                n = len(entry.split("."))
                if parts[:n] != entry.split("."):
                    continue
                match, key = n, entry
            if best is None or match > best[0]:
                best = (match, layer, key)
    return None if best is None else (best[1], best[2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: each strongly connected group of two or more modules, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import against the layer table, and every module the table does not place."""
    out = []
    for module in sorted(graph):
        placed = layer_of(module)
        if placed is None:
            out.append(f"{module}: not in the layer table")
            continue
        for target in sorted(graph[module]):
            there = layer_of(target)
            if there is None:
                continue  # reported as a module of its own
            if there[0] > placed[0]:
                out.append(
                    f"{module} imports {target}: up from layer {placed[0] + 1} ({placed[1]}) "
                    f"to layer {there[0] + 1} ({there[1]})"
                )
            elif (
                there[0] == placed[0]
                and ANY_ALGORITHM in LAYERS[placed[0]]
                and there[1] != placed[1]
            ):
                out.append(f"{module} imports {target}: one algorithm package from another")
    return out


def problems(root: Path, package: str) -> list[str]:
    """What the test fails on: cycles first, then imports against the layering."""
    graph = imports(root, package)
    found = ["an import cycle among " + ", ".join(c) for c in cycles(graph)]
    return found + violations(graph)


def test_the_package_has_no_import_cycle_and_no_import_against_the_layering():
    found = problems(PACKAGE, "distbelief")
    assert not found, "\n".join(["", *found])


# ----------------------------------------------------- the check itself, on a throwaway package


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "toy"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            (root / parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(text))
    return root


# A healthy little package: every import points down or sideways, relative and absolute.
HEALTHY = {
    "errors.py": "class ConfigError(Exception): ...\n",
    "core/flat.py": "from ..errors import ConfigError\n",
    "core/layout.py": "from . import flat\nfrom .flat import ConfigError\n",
    "runtime/base.py": "import toy.core.layout\nfrom toy.errors import ConfigError\n",
    "algorithms/registry.py": "from ..errors import ConfigError\n",
    "algorithms/downpour/__init__.py": "from ..registry import ConfigError\n",
    "algorithms/downpour/master.py": "from ...runtime.base import ConfigError\n",
    "algorithms/sandblaster/__init__.py": "from ..registry import ConfigError\n",
    "algorithms/__init__.py": "from . import downpour, sandblaster\n",
    "api.py": "from .algorithms import downpour\n",
    "cli.py": "def main():\n    from .api import train\n",
}


def test_a_healthy_package_passes_and_its_imports_are_resolved(tmp_path):
    root = _package(tmp_path, HEALTHY)
    graph = imports(root, "toy")
    assert graph["core.layout"] == {"core.flat"}
    assert graph["runtime.base"] == {"core.layout", "errors"}
    assert graph["algorithms.downpour.master"] == {"runtime.base"}
    assert graph["algorithms"] == {"algorithms.downpour", "algorithms.sandblaster"}
    assert graph["cli"] == {"api"}  # a lazy import counts
    assert problems(root, "toy") == []


def test_a_planted_cycle_is_caught_even_through_a_lazy_import(tmp_path):
    root = _package(
        tmp_path,
        {
            **HEALTHY,
            "data/inputs.py": "from .shards import split\n",
            "data/shards.py": "def split():\n    from . import inputs\n",
        },
    )
    assert problems(root, "toy") == ["an import cycle among data.inputs, data.shards"]


def test_a_planted_upward_import_is_caught(tmp_path):
    root = _package(
        tmp_path, {**HEALTHY, "core/flat.py": "from ..errors import ConfigError\nimport toy.cli\n"}
    )
    assert problems(root, "toy") == [
        "core.flat imports cli: up from layer 2 (core) to layer 10 (cli)"
    ]


def test_one_algorithm_package_importing_another_is_caught(tmp_path):
    root = _package(
        tmp_path,
        {**HEALTHY, "algorithms/sandblaster/shard.py": "from ..downpour.master import x\n"},
    )
    assert problems(root, "toy") == [
        "algorithms.sandblaster.shard imports algorithms.downpour.master: "
        "one algorithm package from another"
    ]


@pytest.mark.parametrize(
    "module, layer",
    [
        ("errors", "errors"),
        ("core.flat", "core"),
        ("runtime.ray.wire", "runtime"),
        ("algorithms.messages", "algorithms.messages"),
        ("algorithms.downpour.master", "algorithms.downpour"),
        ("algorithms", "algorithms"),
        ("__main__", "__main__"),
        ("nowhere", None),
    ],
)
def test_the_table_places_a_module_by_its_longest_name(module, layer):
    placed = layer_of(module)
    assert (placed and placed[1]) == layer
