"""The shape of the code (docs/ARCHITECTURE.md): no import cycles between modules (imports inside functions
count), a core without Qt or napari at import time, and no module over about 600 lines unless its docstring
says it is one idea.

The graph is built from the source with :mod:`ast` (nothing is imported), over ``napari_slpd`` and
``src_training``. An edge goes to the most specific module named: ``from a.b import c`` points at the module
``a.b.c`` when there is one, else at ``a.b``; importing a submodule does not add an edge to the package's
``__init__`` (that would make every package whose ``__init__`` re-exports its modules a cycle). Imports under
``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("napari_slpd", "src_training")
# Imported only by the GUI layer (napari_slpd/widgets) at module level.
GUI_LIBRARIES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt", "vispy",
                 "pytestqt")
MAX_LINES = 600
ONE_IDEA = "one idea"


@dataclass(frozen=True)
class Import:
    target: str  # dotted name as written (absolute)
    names: tuple[str, ...]  # for ``from target import names``; () for ``import target``
    line: int
    top_level: bool  # runs when the module is imported (not inside a function)


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_stmt(stmt, top_level)
                continue
            visit_stmt(child, top_level)

    def visit_stmt(child: ast.AST, top_level: bool) -> None:
        if isinstance(child, ast.Import):
            for alias in child.names:
                found.append(Import(alias.name, (), child.lineno, top_level))
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (child.level - 1)]
                target = ".".join(base + ([child.module] if child.module else []))
            else:
                target = child.module or ""
            found.append(Import(target, tuple(a.name for a in child.names), child.lineno, top_level))
        inner = top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        visit(child, inner)

    visit(tree, True)
    return found


@pytest.fixture(scope="module")
def project():
    modules = _modules()
    return modules, {name: _imports(name, path) for name, path in modules.items()}


def _graph(modules, imports) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, found in imports.items():
        for imp in found:
            targets = [f"{imp.target}.{n}" if f"{imp.target}.{n}" in modules else imp.target for n in imp.names] \
                if imp.names else [imp.target]
            for target in targets:
                if target in modules and target != name:
                    graph.add_edge(name, target, line=imp.line)
    return graph


def test_the_graph_sees_function_level_and_relative_imports(project):
    modules, imports = project
    assert "napari_slpd.session" in modules and "src_training.trainer" in modules
    graph = _graph(modules, imports)
    # function-level imports are edges too (the CLI imports its commands inside main())
    assert any(not imp.top_level for found in imports.values() for imp in found)
    assert graph.number_of_edges() > 100
    # a cycle made of a function-level import is found
    graph.add_edge("napari_slpd.slides.slide", "napari_slpd.session")
    assert any(len(c) > 1 for c in nx.strongly_connected_components(graph))


def test_no_import_cycles(project):
    modules, imports = project
    graph = _graph(modules, imports)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    if cycles:
        lines = []
        for component in cycles:
            sub = graph.subgraph(component)
            cycle = nx.find_cycle(sub)
            lines.append(" -> ".join(f"{a} (line {sub.edges[a, b]['line']})" for a, b in cycle) + f" -> {cycle[0][0]}")
        pytest.fail("import cycles (imports inside functions count):\n" + "\n".join(lines))


def test_core_imports_no_gui_at_module_level(project):
    modules, imports = project
    bad = []
    for name, found in imports.items():
        if name == "napari_slpd.widgets" or name.startswith("napari_slpd.widgets."):
            continue
        for imp in found:
            if imp.top_level and imp.target.split(".")[0] in GUI_LIBRARIES:
                bad.append(f"{modules[name].relative_to(ROOT)}:{imp.line} imports {imp.target}")
    assert not bad, "the core must work without Qt/napari (import them inside functions):\n" + "\n".join(bad)


def test_no_private_napari_imports_outside_widgets(project):
    """``napari._qt`` and friends are napari's internals: only the GUI layer may lean on them, and only with
    a comment that names the missing public API (see widgets/)."""
    modules, imports = project
    bad = []
    for name, found in imports.items():
        if name.startswith("napari_slpd.widgets"):
            continue
        for imp in found:
            parts = imp.target.split(".")
            private = parts[0] == "napari" and (any(p.startswith("_") for p in parts[1:])
                                                or any(n.startswith("_") for n in imp.names))
            if private:
                bad.append(f"{modules[name].relative_to(ROOT)}:{imp.line} imports {imp.target}")
    assert not bad, "private napari imports outside napari_slpd/widgets:\n" + "\n".join(bad)


def test_modules_stay_small_or_say_they_are_one_idea(project):
    modules, _ = project
    big = []
    for path in modules.values():
        text = path.read_text(encoding="utf-8")
        n_lines = text.count("\n")
        if n_lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if ONE_IDEA not in doc.lower():
                big.append(f"{path.relative_to(ROOT)}: {n_lines} lines")
    assert not big, (f"modules over {MAX_LINES} lines whose docstring does not say why they are "
                     f"{ONE_IDEA!r}:\n" + "\n".join(big))
