"""The import graph of spdy's modules: no cycles, and the runtime never reaches the profilers.

The graph is read from the source with ``ast``: every ``import`` statement counts, those
inside functions included (a lazy import that closes a cycle is still a cycle of the
design). ``spdy/``, ``profilers/`` and ``database/`` are the packages ``spdy``,
``spdy.profilers`` and ``spdy.database``. An import of a module's own ancestor package
(``from spdy import __version__`` in ``spdy.database.store``) is not an edge: Python
imports a module's parents before the module anyway.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"spdy": "spdy", "profilers": "spdy.profilers", "database": "spdy.database"}
#: modules that run a pruned model; none of them may import the latency profilers
RUNTIME = ("spdy.runtime", "spdy.runtime_cuda", "spdy._modules", "spdy.kernels")


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


def _imported(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The spdy modules that ``name`` imports (anywhere in the file)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                if f"{module}.{alias.name}" in mods:
                    out.add(f"{module}.{alias.name}")
                elif module in mods:
                    out.add(module)
    return {m for m in out if m != name and not name.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imported(name, path, mods) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "spdy.runtime" in graph and "spdy.profilers.torch_backends" in graph and "spdy.database.store" in graph
    assert "spdy._modules" in graph["spdy.profilers.torch_backends"]


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_runtime_never_imports_the_profilers() -> None:
    graph = import_graph()
    for name in graph:
        if name.startswith(RUNTIME):
            bad = sorted(m for m in reachable(graph, name) if m.startswith("spdy.profilers"))
            assert not bad, f"{name} imports {bad}"


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
