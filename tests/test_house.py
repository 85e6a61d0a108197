"""The package's shape, read from its source: every import, inside functions included.

import-linter (``lint-imports``, run by ``.ci/run``) checks the layering; these tests check what
it does not: that no two modules import each other through any path (a lazy import inside a
function hides a circle from a reader but not from this scan), that no module takes another's
private name, and that nothing outside ``memscore.sources`` names a kind of source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "memscore"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path):
    """(module imported, name taken from it or None, line) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield module, alias.name, node.lineno


def _graph() -> dict[str, set[str]]:
    """module -> the memscore modules it imports (``from pkg import module`` is the module)."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for module, taken, _ in _imports(name, path):
            if taken and f"{module}.{taken}" in MODULES:
                targets.add(f"{module}.{taken}")
            elif module in MODULES:
                targets.add(module)
        graph[name] = targets - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_scan_sees_every_module_and_imports_inside_functions():
    # What the other tests rest on: the scan finds the packages of the data flow, and an import
    # written inside a function (cli imports each job only when its command runs).
    for package in ("sources", "stages", "sinks", "models", "scoring", "serve"):
        assert f"memscore.{package}" in MODULES
    assert "memscore.scoring.job" in _graph()["memscore.cli"]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_through_any_import():
    assert _circles(_graph()) == []


def test_no_private_name_is_imported_from_another_module():
    taken = [
        f"{name}:{line} imports {module}.{alias}"
        for name, path in MODULES.items()
        for module, alias, line in _imports(name, path)
        if module.startswith("memscore")
        and alias
        and alias.startswith("_")
        and not alias.startswith("__")
        and module != name
    ]
    assert taken == []


def test_leaf_modules_import_nothing_of_memscore():
    graph = _graph()
    for leaf in ("errors", "columns", "storage", "row_errors", "faults"):
        name = f"memscore.{leaf}"
        assert graph[name] == set(), f"{name} imports {graph[name]}"


@pytest.mark.parametrize("kind", ["webdataset", "images", "csv", "parquet", "jsonl"])
def test_nothing_outside_sources_compares_a_kind(kind):
    # "The source abstraction leaks" (issue 26) was code branching on `manifest.kind == "...":`
    # outside the sources. A comparison with a kind's name anywhere else is that leak again.
    from memscore.sources.manifest import KINDS

    assert kind in {source.kind for source in KINDS}
    found = []
    for name, path in MODULES.items():
        if name.startswith("memscore.sources"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                names_kind = any(
                    isinstance(o, ast.Attribute) and o.attr == "kind" for o in operands
                )
                if names_kind and any(
                    isinstance(o, ast.Constant) and o.value == kind for o in operands
                ):
                    found.append(f"{name}:{node.lineno}")
    assert found == []
