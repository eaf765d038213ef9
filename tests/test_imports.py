"""The import graph of the project's modules: no cycle, and selection stays torch-free.

Every ``import`` counts, function-local ones included (a cycle hidden behind a local
import still ties the modules together and breaks the moment someone hoists it); only
``if TYPE_CHECKING:`` blocks, which never run, are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("variants", "profiler", "adaptive")

#: selection, admission, the simulator and its policies run on made-up numbers anywhere
TORCH_FREE = ("adaptive.select", "adaptive.admission", "adaptive.simulate", "adaptive.policies")
HEAVY = ("torch", "torchvision", "torch_pruning", "onnx", "onnxruntime", "onnxscript",
         "transformers")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the packages and ``cli``."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    out["cli"] = ROOT / "cli.py"
    return out


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(name: str, path: Path, mods: Mapping[str, Path]) -> dict[str, int]:
    """What one module imports, anywhere in its file except ``if TYPE_CHECKING:`` bodies:
    dotted name -> first line. ``from a import b`` names ``a.b`` when that is a project
    module, else ``a``; any other name is cut to the project module that holds it, and
    names outside the project to their top-level package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, int] = {}

    def add(dotted: str, line: int) -> None:
        probe = dotted
        while probe and probe not in mods:
            probe = probe.rpartition(".")[0]
        out.setdefault(probe or dotted.partition(".")[0], line)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                add(sub if sub in mods else base, node.lineno)
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    out.pop(name, None)
    return out


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, set[str]]]:
    """Project module -> {project module it imports: line}, and -> the external packages
    it imports. A parent package's ``__init__`` is not an edge of its submodules (Python
    runs it first, but it is the package's front door, not a dependency)."""
    mods = project_modules()
    graph: dict[str, dict[str, int]] = {}
    external: dict[str, set[str]] = {}
    for name, path in mods.items():
        found = imports_of(name, path, mods)
        graph[name] = {m: line for m, line in found.items() if m in mods}
        external[name] = {m for m in found if m not in mods}
    return graph, external


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one
    cycle through its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_one_cycle(graph, comp) for comp in comps]


def _one_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A closed path through the component, starting at its first module (BFS back)."""
    inside = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in inside and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp  # unreachable for a strongly connected component


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + \
        f" -> {cycle[-1]}"


def test_the_graph_sees_function_local_imports():
    graph, _ = import_graph()
    assert graph["cli"], "cli imports the packages"
    # variants.backends imports the store only inside open_session
    assert "variants.store" in graph["variants.backends"]


def test_cycle_finder_names_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    (cycle,) = cycles(graph)
    assert cycle == ["a", "b", "c", "a"]
    assert _describe(graph, cycle) == "a (line 1) -> b (line 2) -> c (line 3) -> a"


def test_no_import_cycle():
    graph, _ = import_graph()
    found = [_describe(graph, c) for c in cycles(graph)]
    assert not found, "import cycles (break them by moving the shared code below both):\n" + \
        "\n".join(found)


def _closure(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


@pytest.mark.parametrize("module", TORCH_FREE)
def test_selection_never_imports_torch_even_lazily(module):
    graph, external = import_graph()
    reach = _closure(graph, module)
    heavy = sorted(f"{m} imports {x}" for m in reach for x in external[m] if x in HEAVY)
    assert not heavy, f"{module} reaches heavy imports: {heavy}"


def test_selection_modules_import_without_torch():
    code = ("import sys; import " + ", ".join(TORCH_FREE) + "; "
            "heavy = [m for m in " + repr(HEAVY) + " if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
