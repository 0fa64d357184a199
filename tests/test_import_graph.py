"""The package's import graph has no cycle, lazy imports inside functions included.

Imports under `if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import aiotasks

ROOT = Path(aiotasks.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(["aiotasks", *parts]).removesuffix(".__init__")


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    found: list[ast.ImportFrom | ast.Import] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the aiotasks modules it imports at run time.

    Built in a fresh interpreter: in the test process, CPython 3.11.7's ast.parse raised
    SystemError "AST constructor recursion depth mismatch" now and then (see gh-106905:
    ast keeps its recursion depth in module state, which other threads of a busy process,
    such as one formatting a traceback, can disturb).
    """
    code = (
        "import json, tests.test_import_graph as m; "
        "print(json.dumps({k: sorted(v) for k, v in m.graph_here().items()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, check=True
    )
    return {k: set(v) for k, v in json.loads(out.stdout).items()}


def graph_here() -> dict[str, set[str]]:
    """import_graph(), computed in this process."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.ImportFrom):
                candidates = [node.module or ""]
            else:
                candidates = [a.name for a in node.names]
            deps |= {c for c in candidates if c in modules and c != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == "aiotasks":
                continue  # the facade: every module may be reached from it
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "aiotasks.worker" in graph and graph["aiotasks.worker"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_worker_does_not_import_the_cli_or_the_dev_server() -> None:
    graph = import_graph()
    seen: set[str] = set()
    todo = ["aiotasks.worker", "aiotasks.app"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += graph.get(mod, set()) - {"aiotasks"}
    outside = ("aiotasks.cli", "aiotasks.testing", "aiotasks.devserver")
    assert not {m for m in seen if m in outside or m.startswith(tuple(o + "." for o in outside))}
