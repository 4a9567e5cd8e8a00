"""No import circle in the library or the bundle scripts, counting imports inside functions too.

A circle that only works because one side imports lazily (inside a function or a module ``__getattr__``) is still
a circle: the two modules cannot be understood, or moved, one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "multicure_monai"
SCRIPTS = ROOT / "bundle" / "scripts"


def _modules() -> dict[str, Path]:
    """Dotted name -> file for the package's modules (packages named by their folder) and the bundle scripts."""
    modules = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in SCRIPTS.glob("*.py"):
        modules[path.stem] = path  # the scripts import each other as top-level modules
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The known modules that ``name`` imports anywhere in its file (``from pkg import mod`` names ``pkg.mod``,
    ``from pkg import obj`` names ``pkg``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {m for m in found if m in modules and m != name}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted; sorted by first member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}}, [["a", "b", "c"], ["d", "e"]]),
    ],
)
def test_find_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert find_cycles(graph) == expected


def test_lazy_import_counts(tmp_path: Path) -> None:
    """An import inside a function is an edge like any other."""
    (tmp_path / "m.py").write_text("def f():\n    from . import handlers\n    return handlers\n")
    assert _imports("pkg.m", tmp_path / "m.py", {"pkg.m": tmp_path, "pkg.handlers": tmp_path}) == {"pkg.handlers"}


def test_no_import_circle() -> None:
    modules = _modules()
    assert f"{PACKAGE}.metrics.surface_distance" in modules and "experiment" in modules
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert find_cycles(graph) == []
