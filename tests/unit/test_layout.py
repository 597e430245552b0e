"""The house's plan holds: no import cycle among the modules of producer/ or worker/.

import-linter (``make lint``) checks the layers and forbidden imports; this checks what a layers
contract cannot see, a cycle inside one layer (two modules of one package importing each other,
directly or through others), including imports made inside functions.
"""

from __future__ import annotations

import grimp
import pytest


def _cycle(graph: grimp.ImportGraph, modules: set[str]) -> list[str] | None:
    """One import cycle among ``modules`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module) & modules):
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(modules):
        if module not in state and (found := visit(module)):
            return found
    return None


@pytest.mark.parametrize("package", ["producer", "worker"])
def test_no_import_cycles(package: str) -> None:
    graph = grimp.build_graph(package)
    # A package's __init__ re-exports its modules (it imports them); a module importing a sibling
    # through the package is an import of that sibling, which grimp already records.
    modules = {m for m in graph.modules if not _is_reexporting_package(graph, m)}
    cycle = _cycle(graph, modules)
    assert cycle is None, " -> ".join(cycle or [])


def _is_reexporting_package(graph: grimp.ImportGraph, module: str) -> bool:
    return bool(graph.find_children(module))


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    assert _cycle(graph, {"pkg.a", "pkg.b", "pkg.c"}) is None
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycle(graph, {"pkg.a", "pkg.b", "pkg.c"}) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
