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


#: The results package's shared modules: the tools (analyze, ka_study, reproduce,
#: dashboard) import these and never each other; ``plots`` imports no other results module.
RESULTS_SHARED = {"kaedit.results.plots", "kaedit.results.sweep"}


def test_results_tools_share_plots_and_nothing_else_imports_them() -> None:
    graph = import_graph()
    results = {m for m in graph if m.startswith("kaedit.results.")}
    assert results >= RESULTS_SHARED and "kaedit.results.analyze" in results
    outside = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                     if b.startswith("kaedit.results") and not a.startswith("kaedit.results"))
    assert outside == []  # the editing core and the other entry points do not use them
    allowed = {m: RESULTS_SHARED - {m} for m in results}
    allowed["kaedit.results.plots"] = set()
    allowed["kaedit.results.sweep"] = {"kaedit.results.plots"}
    crossing = sorted(f"{m} -> {d}" for m in results for d in graph[m]
                      if d.startswith("kaedit.results.") and d not in allowed[m])
    assert crossing == []


# ---------------------------------------------------------------- private names, setup layer
BENCH = SRC.parent / "benchmarks"


def private_imports(path: Path) -> list[str]:
    """``module.name`` of every underscore name ``path`` takes from a kaedit module: by
    ``from kaedit.x import _name`` or as ``x._name`` where ``x`` is a kaedit module it
    imported (``import kaedit.x as x``, ``from kaedit import x``)."""
    tree = ast.parse(path.read_text())
    own = module_name(path) if path.is_relative_to(SRC) else ""
    modules: dict[str, str] = {}  # local name -> kaedit module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(a.asname or a.name): a.name for a in node.names
                        if a.name.startswith("kaedit") and a.asname}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kaedit"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{node.module}.{a.name}")
                modules[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"{modules[node.value.id]}.{node.attr}")
    return [f for f in found if not own or not f.startswith(own + ".")]


def test_the_private_check_sees_both_forms(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from kaedit.results.analyze import _x, ok\nfrom kaedit import export\n"
                     "export._replay()\nexport.main()\nself._own = 1\n")
    assert private_imports(probe) == ["kaedit.results.analyze._x", "kaedit.export._replay"]


def test_no_module_uses_another_modules_private_names() -> None:
    files = [*(SRC / "kaedit").rglob("*.py"), *BENCH.glob("*.py")]
    used = {str(p.relative_to(SRC.parent)): private_imports(p) for p in files}
    assert {f: names for f, names in used.items() if names} == {}


#: What :func:`kaedit.setup.build_session` does, which an entry point must not do again:
#: instantiate configs, load the model or the records, make the context templates.
SESSION_PIECES = {"build", "build_model", "build_records", "build_schedule", "load_model",
                  "context_templates", "from_config", "instantiate"}


def imported_names(path: Path) -> set[str]:
    """Every ``module.name`` (and module) ``path`` imports, kaedit or not."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def session_pieces(path: Path) -> list[str]:
    return sorted(n for n in imported_names(path)
                  if n.rsplit(".", 1)[-1] in SESSION_PIECES or n == "kaedit.data")


def calls(path: Path, function: str) -> set[str]:
    """Names called inside ``function`` (a ``def`` or ``Class.method`` of ``path``)."""
    tree = ast.parse(path.read_text())
    cls, _, name = function.rpartition(".")
    scope = (next(c for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == cls)
             if cls else tree)
    fn = next(f for f in ast.walk(scope) if isinstance(f, ast.FunctionDef) and f.name == name)
    return {c.func.id if isinstance(c.func, ast.Name) else c.func.attr
            for c in ast.walk(fn) if isinstance(c, ast.Call)
            and isinstance(c.func, (ast.Name, ast.Attribute))}


#: Where each entry point builds its parts: every one of them calls build_session.
SESSION_BUILDERS = {SRC / "kaedit" / "experiment.py": ["run"],
                    SRC / "kaedit" / "editor.py": ["Editor.__init__"],
                    SRC / "kaedit" / "export.py": ["export"],
                    SRC / "kaedit" / "rescore.py": ["rescore"],
                    BENCH / "bench.py": ["phase_statistics", "phase_memory"]}


def test_the_session_check_sees_pieces(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from kaedit import data\n"
                     "def export():\n    from kaedit.setup import build_model, build_session\n"
                     "    from kaedit.methods.keys import context_templates\n"
                     "    return build_model(None)\n")
    assert session_pieces(probe) == ["kaedit.data", "kaedit.methods.keys.context_templates",
                                     "kaedit.setup.build_model"]
    assert "build_model" in calls(probe, "export")
    assert "build_session" not in calls(probe, "export")


def test_entry_points_build_their_session_through_the_setup_layer() -> None:
    for path, functions in SESSION_BUILDERS.items():
        assert session_pieces(path) == [], f"{path.name} builds parts itself"
        for function in functions:
            assert "build_session" in calls(path, function), f"{path.name}: {function}"


#: The layers of docs/development.md ("What may import what"), bottom up: a module imports
#: only modules of its own layer or below. Modules not listed (the recipe, the entry points
#: and the analysis tools) are the top layer and may import any.
LAYERS = (
    "errors paths records files timing sampling metrics hooks jobdirs methods.projections",
    "models tokens weights checkpoint schedule fusion tracking stats data data.base "
    "data.fields data.counterfact data.zsre data.merge",
    "methods.base methods.templates methods.keys methods.nas methods.targets methods.solve "
    "methods.objectives evaluate perplexity wild evaluation",
    "methods.memit methods.pmet methods.adaple methods.rome methods.ft methods.mend "
    "methods.alphaedit methods.encore methods.ultraedit",
    "setup",
)


def test_modules_import_only_their_layer_or_below() -> None:
    graph = import_graph()
    layer = {f"kaedit.{m}": i for i, names in enumerate(LAYERS) for m in names.split()}
    assert set(layer) <= set(graph), sorted(set(layer) - set(graph))  # no stale names
    top = len(LAYERS)
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                    if layer.get(b, top) > layer.get(a, top))
    assert upward == []


def test_readme_stays_a_front_page() -> None:
    """Issue 29: the README is at most 200 lines (what kaedit is, install, the two
    commands, one example per entry point, a short measured summary); the rest lives in
    docs/."""
    readme = SRC.parent / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
