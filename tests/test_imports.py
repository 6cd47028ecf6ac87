"""The modules of src/ import each other without a cycle, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(tree: ast.AST, known: set[str]) -> set[str]:
    """The lmforge modules a module imports anywhere in its body (``from a import b`` counts ``a.b`` if a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: imported_modules(ast.parse(p.read_text()), set(paths)) - {name} for name, p in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph[name]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(name)
        return None

    return next((c for name in sorted(graph) if (c := visit(name))), None)


def test_src_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "lmforge.compose.run" in graph["lmforge.training"]  # the walk sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    tree = ast.parse("def late():\n    from lmforge.b import thing\n")
    graph = {"lmforge.a": imported_modules(tree, {"lmforge.a", "lmforge.b"}), "lmforge.b": {"lmforge.a"}}
    assert find_cycle(graph) == ["lmforge.a", "lmforge.b", "lmforge.a"]


def test_no_module_imports_the_cli():
    graph = import_graph()
    assert [name for name, targets in graph.items() if "lmforge.cli" in targets] == []
