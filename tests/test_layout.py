"""The benchmarks' layout: no module of bench/ imports one that imports it back, directly or
through others, counting every import statement (those inside functions too, which run as
surely as the others, only later)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def module_names(package: str) -> dict[str, Path]:
    """Every module of ``package`` under the repo, by dotted name (a package by its own)."""
    names = {}
    for path in (REPO / package).rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` and the modules of it that it imports."""
    modules = module_names(package)

    def owner(name: str) -> str | None:
        """The module that an imported name lives in: ``a.b.c`` is module ``a.b.c``, or a
        name defined in ``a.b``."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in filter(None, map(owner, targets)):
                if target != name:
                    graph[name].add(target)
    return graph


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules, the first repeated last), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_the_check_finds_a_circle() -> None:
    """The check itself: bench/'s graph has its edges, and a circle added to it is found."""
    graph = import_graph("bench")
    assert sum(map(len, graph.values())) > 50
    assert "bench.common.procs" in graph["bench.common.lifecycle"]
    assert "bench.common.lifecycle" in graph["bench.common.installs"]
    graph["bench.common.procs"].add("bench.common.installs")
    found = circle(graph)
    assert found is not None
    assert {"bench.common.procs", "bench.common.installs"} <= set(found)


@pytest.mark.parametrize("package", ["bench", "imgcache"])
def test_no_import_circle(package: str) -> None:
    found = circle(import_graph(package))
    assert found is None, f"import circle in {package}/: {' -> '.join(found or [])}"
