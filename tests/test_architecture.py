"""The package's shape: imports only point one way, a small public API, modules of one concern, a short README.

These read the source (the import statements, ``__all__``, line counts), so they hold for every import, also those
inside functions; imports under ``if TYPE_CHECKING:`` are annotations only and are left out.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import batchfinder as bf
import batchfinder.cli
import batchfinder.engine.oom
import batchfinder.memory.estimate
import batchfinder.memory.tracing
import batchfinder.plot
import batchfinder.training.synthetic

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
    assert len(bf.__all__) <= 16  # the search, estimates, the runtime guard, results, devices and errors
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


WORDED = [batchfinder.memory.estimate, batchfinder.memory.tracing, batchfinder.cli, batchfinder.plot,
          batchfinder.training.synthetic, batchfinder.engine.oom]
"""Modules whose text users read: no internal words ("seeds") in their docstrings, comments or messages."""


@pytest.mark.parametrize("module", WORDED, ids=lambda m: m.__name__)
def test_source_does_not_say_seeds(module):
    """Docstrings, comments and messages alike (the source holds them all)."""
    assert "seeds" not in inspect.getsource(module).lower()


# -- the layers -----------------------------------------------------------------------------------------------------
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("batchfinder.errors", "batchfinder.units")),
    ("search", ("batchfinder.search",)),
    ("training", ("batchfinder.training",)),
    ("results", ("batchfinder.result", "batchfinder.report", "batchfinder.plot")),
    ("memory", ("batchfinder.memory",)),
    ("devices", ("batchfinder.devices",)),
    ("engine", ("batchfinder.engine",)),
    ("front ends", ("batchfinder.api", "batchfinder.cli", "batchfinder.loading", "batchfinder.guard", "batchfinder.lightning", "batchfinder.hf", "batchfinder.zoo",
                    "batchfinder.estimate", "batchfinder.gpus", "batchfinder.transformers", "batchfinder")),
]
"""The layers, lowest first: a module may import its own layer and the layers below it, never one above."""


def _layer(module: str) -> int:
    for rank, (_name, prefixes) in enumerate(LAYERS):
        if any(module == p or (module.startswith(p + ".") and p != "batchfinder") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md")


def test_every_module_belongs_to_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_point_down_the_layers():
    upward = sorted(
        f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for name, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(name)
    )
    assert upward == []


def test_the_search_layer_imports_no_torch():
    found = []
    for name, path in MODULES.items():
        if not name.startswith("batchfinder.search"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{name}: {m}" for m in modules if m.split(".")[0] in ("torch", "numpy")]
    assert found == []


def test_the_top_level_is_small_and_the_layers_are_folders():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 14, top
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert {"search", "training", "memory", "devices", "engine", "lightning", "hf"} <= set(subpackages)
    for package in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(package.read_text()))
        assert doc and len(doc) > 80, f"{package.parent.name}/ says not what it owns and may import"


def test_no_module_imports_another_modules_private_names():
    private = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("batchfinder")):
                private += [f"{name}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert private == []


def test_a_mode_is_known_by_name_in_one_place():
    """The engine asks the mode object (records_on_entry, searches_evaluation, strategy); only the registry and the
    front ends' defaults name a mode."""
    compared = []
    for name, path in MODULES.items():
        text = path.read_text()
        if name == "batchfinder.engine.modes":
            continue
        if re.search(r"""(==|!=|\bin)\s*\(?["'](guided|binsearch|power)["']""", text) or "MODES[" in text:
            compared.append(name)
    assert compared == []


_INTERNAL_EXCEPTIONS = {
    "AllocatorOutOfMemory": "the allocator model's own (stdlib only); the ledger raises torch.OutOfMemoryError",
    "UnsuitableForReplay": "caught inside the memory layer: a log that cannot replay falls back to tracing",
    "CommandError": "the command line's: printed as its error message, never raised to a caller",
}


def test_every_public_exception_is_in_errors():
    import batchfinder.errors as errors

    stray = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and name != "batchfinder.errors":
                bases = {ast.unparse(b) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) for b in bases) and node.name not in _INTERNAL_EXCEPTIONS:
                    stray.append(f"{name}.{node.name}")
    assert stray == []
    for name in ("NoBatchSizeFitsError", "SearchIncompleteError", "RankFailedError", "FakeTensorUnsupportedError",
                 "StepContractError", "LossTypeError", "LossValueError", "BatchFinderError"):
        assert isinstance(getattr(errors, name), type) and name in errors.__doc__
    exported = [n for n in bf.__all__ if isinstance(getattr(bf, n), type) and issubclass(getattr(bf, n), BaseException)]
    assert all(getattr(bf, n) is getattr(errors, n) for n in exported)


def test_the_documented_import_paths_work():
    from batchfinder.estimate import MemoryEstimate, estimate_memory, estimate_memory_curve  # noqa: F401
    from batchfinder.gpus import GPUSpec, lookup_gpu  # noqa: F401
    from batchfinder.lightning import BatchFinder  # noqa: F401
    from batchfinder.transformers import find_trainer_batch_size  # noqa: F401
    from batchfinder.units import format_bytes  # noqa: F401
    from batchfinder.zoo import mnist_mlp  # noqa: F401
    from batchfinder.engine import SearchOptions, Workload, search  # noqa: F401

    assert estimate_memory is bf.estimate_memory


def test_the_architecture_map_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for name, path in MODULES.items():
        relative = path.relative_to(PACKAGE)
        shown = str(relative.parent) + "/" if relative.name == "__init__.py" else str(relative)
        if shown in ("./",):
            continue
        if f"`{shown}`" not in text:
            missing.append(shown)
    assert missing == [], f"docs/architecture.md does not name {missing}"
