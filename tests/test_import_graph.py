"""No import cycles within ``fastppo.engine`` or ``fastppo.benchmarks``.

The graph is read from the source (``ast``), not from running the imports: every ``import`` statement of a module
counts, at the top level, inside a function body or under a condition, because an import moved into a function
to dodge a cycle is still the same cycle. ``from package import name`` points at the submodule ``package.name``
when there is one, else at the package. The implicit import of a parent package before its submodule is not an
edge: the import system runs a package's ``__init__`` first, so a package may import its own submodules.
"""

from __future__ import annotations

import ast
from pathlib import Path

from fastppo._layout import LAYOUT

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("fastppo.engine", "fastppo.benchmarks")


def _modules() -> dict[str, Path]:
    """Every module of the installed fastppo tree (the package and the root folders it installs) -> its file."""
    folders = {"fastppo": ROOT / "fastppo", **{name: ROOT / folder for name, folder in LAYOUT.items()}}
    out = {}
    for package, folder in folders.items():
        for f in folder.rglob("*.py"):
            parts = [package, *f.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _imported(name: str, path: Path) -> set[str]:
    """The dotted names ``name`` (in file ``path``) imports, relative imports resolved."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the tree it imports``."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for dotted in _imported(name, path):
            while dotted and dotted not in mods:  # ``pkg.attr`` -> ``pkg``; outside the tree -> ""
                dotted = dotted.rpartition(".")[0]
            if dotted and dotted != name:
                targets.add(dotted)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "fastppo.engine.trainer" in graph["fastppo.engine"]  # the lazy import in the package's __getattr__
    assert "fastppo.engine.config" in graph["fastppo.engine.trainer"]
    assert "fastppo.benchmarks.result_files" in graph["fastppo.benchmarks.report"]  # a relative import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_engine_or_the_benchmarks():
    bad = []
    for comp in cycles(import_graph()):
        for package in CHECKED:
            inside = [m for m in comp if _within(m, package)]
            if len(inside) > 1:
                bad.append(f"{package}: {' <-> '.join(inside)}")
    assert not bad, "import cycles (move the shared helper to the module that owns it): " + "; ".join(bad)
