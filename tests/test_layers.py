"""The import graph keeps its layers.

Layers, bottom to top. A module may import from its own layer and from the layers
below it, never from one above:

1. ``federation``: the library. Configuration, PKI, gRPC plumbing, storage, each
   service's domain code with its client and converters, and the launcher
   (``federation.launch``), which runs the daemons as processes
   (``python -m federation.cli node …``) and never imports them.
2. ``nodes`` (the gRPC daemons) and ``gateway_http`` (the HTTP gateway). Both sit
   above the library and side by side: neither imports the other, because they
   talk over gRPC.
3. ``federation.cli``: the ``federation`` command. It is the only package that
   imports the daemons and the gateway (to run them), and nothing imports it.

Every import statement counts, wherever it stands: module level, a function body
or ``if TYPE_CHECKING:``. ``importlib.import_module`` and ``__import__`` are refused
in these packages because the edge they create cannot be read from the source.
Within a layer, no modules import each other, directly or around a longer loop
(a package's ``__init__`` that its own submodules import on the way in does not
count as a loop).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("federation", "nodes", "gateway_http")
GENERATED = ROOT / "federation" / "v1"

LIBRARY, NODES, GATEWAY, CLI = "federation", "nodes", "gateway_http", "federation.cli"
MAY_IMPORT: dict[str, frozenset[str]] = {
    LIBRARY: frozenset({LIBRARY}),
    NODES: frozenset({LIBRARY, NODES}),
    GATEWAY: frozenset({LIBRARY, GATEWAY}),
    CLI: frozenset({LIBRARY, NODES, GATEWAY, CLI}),
}
"""Which layers each layer's modules may import."""


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name; ``None`` outside the project (stdlib, PyPI)."""
    if module == CLI or module.startswith(CLI + "."):
        return CLI
    top = module.split(".", 1)[0]
    return top if top in PACKAGES else None


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if GENERATED not in path.parents:
                yield path


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in ``path``, relative ones resolved."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            yield node.lineno, module
            # ``from federation import cli`` imports the module federation.cli.
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def dynamic_imports(path: Path) -> Iterator[int]:
    """Lines calling ``importlib.import_module`` or ``__import__``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__"):
            yield node.lineno


def upward_imports() -> list[str]:
    found = []
    for path in source_files():
        importer = layer_of(module_name(path))
        assert importer is not None
        for line, module in imported_modules(path):
            imported = layer_of(module)
            if imported is not None and imported not in MAY_IMPORT[importer]:
                found.append(f"{path.relative_to(ROOT)}:{line} ({importer}) imports {module}")
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``a.b.name`` resolved to ``a.b``)."""
    modules = {module_name(path): path for path in source_files()}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = set()
        for _, target in imported_modules(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert upward_imports() == []


def test_no_dynamic_imports_hide_an_edge() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}"
             for path in source_files() for line in dynamic_imports(path)]
    assert found == []


def test_no_import_cycles() -> None:
    assert import_cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_loop_through_three_modules() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize(("module", "layer"), [
    ("federation.config", LIBRARY),
    ("federation.launch.up", LIBRARY),
    ("federation.cli", CLI),
    ("federation.cli.keys", CLI),
    ("federation.client", LIBRARY),
    ("nodes.keys", NODES),
    ("gateway_http.app", GATEWAY),
    ("grpc", None),
])
def test_layer_of(module: str, layer: str | None) -> None:
    assert layer_of(module) == layer


def test_the_checker_sees_imports_in_function_bodies_and_relative_ones(tmp_path: Path) -> None:
    # The rule is only as good as its reading of the source: a lazy import inside a
    # function, a relative import and a from-import of a submodule are all edges.
    source = tmp_path / "federation" / "sample.py"
    source.parent.mkdir()
    source.write_text(
        "def run():\n"
        "    from nodes.daemon import serve\n"
        "from . import cli\n"
        "import importlib\n"
        "importlib.import_module('gateway_http.app')\n"
    )
    edges = {module for _, module in imported_modules(source, tmp_path)}
    assert {"nodes.daemon", "federation.cli"} <= edges
    assert list(dynamic_imports(source)) == [5]

