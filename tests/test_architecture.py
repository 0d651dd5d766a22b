"""The package's shape: imports only point one way, a small public API, modules of one concern, a short README.

These read the source (the import statements, ``__all__``, line counts), so they hold for every import, also those
inside functions; imports under ``if TYPE_CHECKING:`` are annotations only and are left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import batchfinder as bf

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "batchfinder"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def _imports(name: str, path: Path) -> set[str]:
    """Package modules that ``name`` imports, anywhere in its source except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    found.add(f"{target}.{alias.name}")
                elif target in MODULES:
                    found.add(target)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    return cycles


def test_the_import_graph_reads_function_level_imports():
    # The reader itself: cli imports most commands inside functions, and those edges must be in the graph.
    assert "batchfinder.memory.predict" in GRAPH["batchfinder.cli"]
    assert "batchfinder.plot" in GRAPH["batchfinder.result"]  # a function-level import
    assert "batchfinder.result" not in GRAPH["batchfinder.plot"]  # only under TYPE_CHECKING there


def test_no_import_cycles():
    assert _cycles() == []


def test_search_modes_are_registered_in_one_place():
    sources = {name: path.read_text() for name, path in MODULES.items()}
    assert [name for name, text in sources.items() if re.search(r"^MODES\b", text, re.M)] == ["batchfinder.engine.modes"]
    assert not any(re.search(r"MODES\s*\[[^\]]+\]\s*=|MODES\.(setdefault|update)\(", text) for text in sources.values())


def test_public_api_fits_on_one_screen():
    assert len(bf.__all__) <= 15
    assert len(set(bf.__all__)) == len(bf.__all__)
    for name in bf.__all__:
        assert getattr(bf, name).__doc__, f"{name} has no docstring"


def test_no_module_does_several_jobs():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 600}
    assert long == {}
    lightning = {name: n for name, path in MODULES.items() if name.startswith("batchfinder.lightning")
                 if (n := len(path.read_text().splitlines())) > 400}
    assert lightning == {}


def test_every_module_logs_under_its_own_name():
    hard_coded = [name for name, path in MODULES.items() if re.search(r"getLogger\(\s*[\"']", path.read_text())]
    assert hard_coded == []


def test_readme_is_short_and_speaks_the_users_language():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12_000
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README links to a missing {link}"
    places = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *PACKAGE.rglob("*.py"), *(ROOT / "examples").rglob("*.py")]
    jargon = [str(p.relative_to(ROOT)) for p in places if re.search(r"\bseeds?'", p.read_text()) or "the seeds" in p.read_text()]
    assert jargon == []
