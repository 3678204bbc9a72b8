"""The shape of the code (docs/ARCHITECTURE.md): stages that form layers (each imports only what its row of the
documentation's "may import" table names), no import cycles between modules or between stages (imports inside
functions count), a core without Qt or napari at import time, a short top level, shared conventions defined
once, and no module over 700 lines (over about 600 only when its docstring says it is one idea).

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
HARD_MAX_LINES = 700
ONE_IDEA = "one idea"
MAX_TOP_LEVEL_MODULES = 6
ARCHITECTURE_DOC = ROOT / "docs" / "ARCHITECTURE.md"
# Modules every stage may import: the errors and the package root (its __version__).
OPEN_TO_ALL = ("errors", "napari_slpd")
# Conventions with one home each (docs/ARCHITECTURE.md): a second definition is a second convention.
DEFINED_ONCE = ("resolve_device", "cuda_available", "autocast_dtype", "atomic_path", "atomic_write_json",
                "atomic_folder", "atomic_write_new", "keep_backup", "is_dicom_folder", "progress_span")
# Vocabularies with one home each: the choices the CLI, the panels and the core offer alike.
NAMED_ONCE = ("PROTOCOLS", "MPP_FALLBACKS", "DEVICE_CHOICES", "SLIDE_SUFFIXES")
# Renames outside utils/files.py, each a protocol of its own rather than "write a file atomically".
RENAMES_ALLOWED = {
    "napari_slpd/utils/files.py": "the atomic writers",
    "napari_slpd/features/store_writer.py": "a resumable extraction's partial file takes its final name when complete",
    "napari_slpd/features/store_versions.py": "a journalled update of a feature file's copy (recovered after a kill)",
    "napari_slpd/utils/storage.py": "setting a damaged file aside; the user config (files.py imports this module)",
    "napari_slpd/utils/locks.py": "a stale lock set aside",
}


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


# -- stages and layers ----------------------------------------------------------------------------------------


def stage_of(module: str) -> str:
    """``napari_slpd.features.store`` -> ``features``; root modules are stages of their own (``cohort``,
    ``errors``, ``__main__``); the package root is ``napari_slpd``; ``src_training`` is one stage."""
    parts = module.split(".")
    if parts[0] == "src_training":
        return "src_training"
    return parts[1] if len(parts) > 1 else parts[0]


def may_import_table(text: str) -> dict[str, set[str]]:
    """The "may import" column of the architecture document's stage table: stage -> stages it may import."""
    table: dict[str, set[str]] = {}
    header_seen = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 3 and cells[2] == "may import":
            header_seen = True
            continue
        if not header_seen:
            continue
        if not cells:
            if table:
                break
            continue
        if set(cells[0]) <= set("- "):
            continue
        stage = cells[0].strip("`").removesuffix("/").removesuffix(".py")
        allowed = {name.strip().strip("`") for name in cells[2].split(",")} - {"—", "-", ""}
        table[stage] = allowed
    return table


@pytest.fixture(scope="module")
def layers():
    return may_import_table(ARCHITECTURE_DOC.read_text(encoding="utf-8"))


def _stage_edges(modules, imports) -> dict[tuple[str, str], list[str]]:
    graph = _graph(modules, imports)
    edges: dict[tuple[str, str], list[str]] = {}
    for a, b, data in graph.edges(data=True):
        sa, sb = stage_of(a), stage_of(b)
        if sa != sb and sb not in OPEN_TO_ALL and sa != "napari_slpd":
            edges.setdefault((sa, sb), []).append(f"{modules[a].relative_to(ROOT)}:{data['line']} imports {b}")
    return edges


def test_the_may_import_table_is_read(layers):
    assert {"utils", "slides", "features", "cohort", "session", "cli", "widgets", "src_training"} <= set(layers)
    assert layers["utils"] == set() and layers["slides"] == {"utils"}
    assert "widgets" not in layers["session"]
    # the table itself is layered: no stage reaches itself through others
    graph = nx.DiGraph([(a, b) for a, allowed in layers.items() for b in allowed])
    assert nx.is_directed_acyclic_graph(graph), nx.find_cycle(graph)


def test_every_stage_has_a_row(project, layers):
    modules, _ = project
    stages = {stage_of(m) for m in modules} - set(OPEN_TO_ALL)
    missing = sorted(stages - set(layers))
    assert not missing, f"stages without a row in {ARCHITECTURE_DOC.name}'s may-import table: {missing}"


def test_stages_import_only_what_their_row_allows(project, layers):
    modules, imports = project
    bad = []
    for (a, b), where in sorted(_stage_edges(modules, imports).items()):
        if b not in layers.get(a, set()):
            bad.append(f"{a} -> {b}: " + "; ".join(where[:3]) + (f" (+{len(where) - 3} more)" if len(where) > 3 else ""))
    assert not bad, ("imports the may-import table of docs/ARCHITECTURE.md does not allow (imports inside functions "
                     "count):\n" + "\n".join(bad))


def test_the_layer_check_catches_an_upward_import(project, layers):
    modules, imports = project
    edges = _stage_edges(modules, imports)
    assert ("session", "features") in edges and "features" in layers["session"]
    imports = dict(imports)
    imports["napari_slpd.features.store"] = imports["napari_slpd.features.store"] + [
        Import("napari_slpd.session", ("Session",), 1, False)]
    edges = _stage_edges(modules, imports)
    assert ("features", "session") in edges and "session" not in layers["features"]


def test_no_import_cycles_between_stages(project):
    modules, imports = project
    graph = nx.DiGraph(list(_stage_edges(modules, imports)))
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"stages that import each other (imports inside functions count): {cycles}"


def test_a_short_top_level(project):
    modules, _ = project
    top = sorted(m for m, path in modules.items() if m.count(".") == 1 and m.startswith("napari_slpd.")
                 and path.name != "__init__.py")
    assert len(top) + 1 <= MAX_TOP_LEVEL_MODULES, f"modules at the top of napari_slpd (and its __init__): {top}"


def test_no_module_over_the_hard_limit(project):
    modules, _ = project
    big = [f"{path.relative_to(ROOT)}: {n}" for path in modules.values()
           if (n := path.read_text(encoding="utf-8").count("\n")) > HARD_MAX_LINES]
    assert not big, f"modules over {HARD_MAX_LINES} lines:\n" + "\n".join(big)


def test_shared_conventions_are_defined_once(project):
    modules, _ = project
    found: dict[str, list[str]] = {name: [] for name in DEFINED_ONCE + NAMED_ONCE}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in DEFINED_ONCE:
                found[node.name].append(f"{path.relative_to(ROOT)}:{node.lineno}")
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id in NAMED_ONCE:
                    found[target.id].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    twice = {name: where for name, where in found.items() if len(where) > 1}
    missing = [name for name, where in found.items() if not where]
    assert not twice, f"conventions defined more than once: {twice}"
    assert not missing, f"conventions no longer defined (update DEFINED_ONCE): {missing}"


def test_files_are_written_through_the_atomic_writers(project):
    """A temp-file-and-rename written by hand is a second atomic writer: outside utils/files.py only the
    protocols of RENAMES_ALLOWED rename files."""
    modules, _ = project
    bad = []
    for path in modules.values():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("replace", "rename") and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "os" and rel not in RENAMES_ALLOWED):
                bad.append(f"{rel}:{node.lineno}")
    assert not bad, "os.replace/os.rename outside the atomic writers (use napari_slpd.utils.files):\n" + "\n".join(bad)
