"""The architecture as a test: data flows builder -> catalog <- query, and no module imports in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("builder", "catalog", "query")


def _imports() -> dict[str, set[str]]:
    """Every module of the packages -> the modules of the packages it imports (lazy and
    TYPE_CHECKING imports included: a circle hidden in a function is still a circle)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
            modules[name] = found
    return {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}


def test_dependencies_flow_one_way() -> None:
    graph = _imports()
    assert len(graph) > 20
    wrong = sorted((m, d) for m, deps in graph.items() for d in deps
                   if m.split(".")[0] == "catalog" and d.split(".")[0] != "catalog"
                   or m.split(".")[0] == "query" and d.split(".")[0] == "builder")
    assert wrong == []


def test_no_import_circles() -> None:
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []
