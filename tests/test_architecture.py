"""The import contracts docs/ARCHITECTURE.md states, read from the code's own imports
(`make lint` runs this file): the layers point one way (cli -> run -> stages -> bench),
bench/core speaks only its own words, the trainer processes' code imports nothing of
the appliance but bench/core, no import cycle, no module over 350 lines, and the
orchestrator only sequences the stages."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "entrypoint")
ORCHESTRATOR = "entrypoint.run"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports anywhere in it (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] in PACKAGES}


SOURCES = {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}
GRAPH = {module: project_imports(path) for module, path in SOURCES.items()}
PACKAGE_INITS = {module: path for module, path in SOURCES.items() if path.name == "__init__.py"}


def imports_of(module: str) -> set[str]:
    """The modules ``module`` imports (``from bench.verdict import document`` names
    bench.verdict.document), not counting the packages on the way, whose __init__
    holds only a docstring."""
    return {name for name in GRAPH[module] if name in GRAPH and name != module and name not in PACKAGE_INITS}


def layer(module: str) -> int:
    """Higher layers may import lower ones, never the reverse."""
    if module.startswith("entrypoint.cli") or module == "entrypoint.__main__":
        return 4
    if module == ORCHESTRATOR:
        return 3
    if module.startswith("entrypoint"):
        return 2  # the stages, the tools and the words they share
    return 1  # bench


def test_the_graph_is_read():
    assert "bench.verdict.document" in imports_of("entrypoint.finish")
    assert "bench.core.statuses" in imports_of("bench.verdict.judgement")


def test_package_inits_hold_only_a_docstring():
    """So that importing a package imports nothing more (the graph above relies on it)."""
    bodies = {str(path.relative_to(REPO)): ast.parse(path.read_text()).body for path in PACKAGE_INITS.values()}
    assert {
        path: len(body)
        for path, body in bodies.items()
        if path not in ("entrypoint/__init__.py",)  # the version, written once
        and not (len(body) == 1 and isinstance(body[0], ast.Expr))
    } == {}


def test_no_import_points_up():
    upward = {
        module: sorted(n for n in imports_of(module) if layer(n) > layer(module))
        for module in GRAPH
        if any(layer(n) > layer(module) for n in imports_of(module))
    }
    assert upward == {}


def test_bench_core_imports_only_bench_core():
    wrong = {m: sorted(n for n in imports_of(m) if not n.startswith("bench.core")) for m in GRAPH}
    assert {m: names for m, names in wrong.items() if m.startswith("bench.core") and names} == {}


def test_the_trainer_processes_import_only_bench_core():
    """bench/trainer/ runs inside XTuner's processes: it shares only the words of bench/core."""
    allowed = ("bench.core", "bench.trainer")
    wrong = {m: sorted(n for n in imports_of(m) if not n.startswith(allowed)) for m in GRAPH}
    assert {m: names for m, names in wrong.items() if m.startswith("bench.trainer") and names} == {}


def test_only_the_trainer_processes_import_bench_trainer():
    """bench/recipe/render.py names the trainer's modules in the config it renders, as text."""
    appliance = [module for module in GRAPH if not module.startswith("bench.trainer")]
    importing = {module: sorted(n for n in imports_of(module) if n.startswith("bench.trainer")) for module in appliance}
    assert {module: names for module, names in importing.items() if names} == {}


def test_no_import_cycle():
    try:
        TopologicalSorter({module: imports_of(module) for module in GRAPH}).prepare()
    except CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")


def test_no_module_is_over_350_lines():
    """A module a reader can hold in mind; a longer one is split by what it does."""
    lengths = {module: len(path.read_text().splitlines()) for module, path in SOURCES.items()}
    assert {module: n for module, n in lengths.items() if n > 350} == {}


def test_the_orchestrator_only_sequences_the_stages():
    """entrypoint/run.py imports the stages and what it hands between them, at most 10 modules."""
    assert len(imports_of(ORCHESTRATOR)) <= 10, sorted(imports_of(ORCHESTRATOR))
