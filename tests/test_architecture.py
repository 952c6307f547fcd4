"""The import contracts docs/ARCHITECTURE.md states, read from the code's own imports:
`bench/` never imports `entrypoint/`, the appliance never imports `bench/trainer/`
(the trainer processes' code), and no two project modules import each other."""

from __future__ import annotations

import ast
from itertools import combinations
from pathlib import Path

REPO = Path(__file__).parent.parent


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
    return {name for name in names if name.split(".")[0] in ("bench", "entrypoint")}


GRAPH = {
    module_name(path): project_imports(path)
    for package in ("bench", "entrypoint")
    for path in sorted((REPO / package).rglob("*.py"))
}


def imports_of(module: str) -> set[str]:
    """What ``module`` imports, as modules of the graph (``from bench import verdict`` names bench.verdict.document)."""
    return {name for name in GRAPH[module] if name in GRAPH and name != module}


def test_the_graph_is_read():
    assert "entrypoint.run" in GRAPH and "bench.verdict.document" in imports_of("entrypoint.run")


def test_bench_never_imports_entrypoint():
    wrong = {module: sorted(n for n in names if n.startswith("entrypoint")) for module, names in GRAPH.items()}
    assert {module: names for module, names in wrong.items() if module.startswith("bench") and names} == {}


def test_only_the_trainer_processes_import_bench_trainer():
    """bench/recipe/render.py names the trainer's modules in the config it renders, as text."""
    appliance = [module for module in GRAPH if not module.startswith("bench.trainer")]
    importing = {module: sorted(n for n in GRAPH[module] if n.startswith("bench.trainer")) for module in appliance}
    assert {module: names for module, names in importing.items() if names} == {}


def test_no_two_modules_import_each_other():
    cycles = [(a, b) for a, b in combinations(GRAPH, 2) if b in imports_of(a) and a in imports_of(b)]
    assert cycles == []


def test_no_module_is_over_350_lines():
    """A module a reader can hold in mind; a longer one is split by what it does."""
    lengths = {
        module: len(path.read_text().splitlines())
        for package in ("bench", "entrypoint")
        for path in (REPO / package).rglob("*.py")
        if (module := module_name(path))
    }
    assert {module: n for module, n in lengths.items() if n > 350} == {}
