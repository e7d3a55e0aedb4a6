"""The house's structure: the recipe does not pull in the tracing tool, errors.py depends on
nothing, and no kaedit module imports another that imports it back (at any depth, function
level imports included: a lazy import is a hidden cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kaedit_imports(path: Path) -> set[str]:
    """The kaedit modules ``path`` imports anywhere in the file (``from kaedit import data``
    counts as ``kaedit.data``); a package's own ``__init__`` is not counted."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kaedit")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kaedit"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / "kaedit").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = {d for d in kaedit_imports(path) if d in files and d != name}
        graph[name] = {d for d in deps if not name.startswith(d + ".")}  # own package init
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once from where it closes)."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                found.append([*stack[stack.index(nxt):], nxt])
            elif state[nxt] == 0:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node)
    return found


def test_the_graph_sees_imports() -> None:
    graph = import_graph()
    assert "kaedit.setup" in graph["kaedit.experiment"]
    assert "kaedit.trace.compute" in graph["kaedit.trace.tables"]


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_errors_depend_on_nothing() -> None:
    assert kaedit_imports(SRC / "kaedit" / "errors.py") == set()


def test_importing_the_recipe_does_not_import_the_tracing_package() -> None:
    code = ("import sys, kaedit.experiment, kaedit.run; "
            "print(sorted(m for m in sys.modules if m.startswith('kaedit.trace')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"
