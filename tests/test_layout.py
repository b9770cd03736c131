"""The package's layout, checked against the document that states it.

``docs/architecture.md`` ("Modules, bottom up") lists every module in
import order; ``layout_problems`` reads that table and the package's source
(``ast``, nothing is imported) and reports:

* an import, annotation-only ones under ``TYPE_CHECKING`` included, of a
  module from one in a row above it (a row may name several modules, which
  share a floor and may import each other);
* a module that is not in the table;
* a function-local import of one of our own modules;
* an I/O import in a sans-IO core (``SANS_IO``): ``IO_MODULES``, except the
  few ``threading`` names that only make data thread-safe (``THREAD_SAFE``).

The package's ``__init__`` is outside the order: it re-exports every public
name lazily and any module may read the package itself.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import meshipc

PACKAGE = Path(meshipc.__file__).parent
DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
PACKAGE_NAME = "meshipc"
#: the modules that must not do I/O: tested without sockets or loops
SANS_IO = ("_wire", "_handshake", "_ports", "_codec", "_boundary")
IO_MODULES = frozenset({"asyncio", "socket", "selectors", "threading", "subprocess"})
#: what a sans-IO core may take from ``threading``: locks and thread
#: identity (for sends from other threads), never a thread of its own
THREAD_SAFE = frozenset({"RLock", "Lock", "local", "get_ident"})
SECTION = "## Modules, bottom up"
INIT = "__init__"


def floors(doc: str) -> dict[str, int]:
    """Module name -> its row in the table of ``SECTION`` (0 = bottom). Any
    number of rows; a row's first cell names one or more modules in
    backticks; rows after the table (or other tables) are not read."""
    start = doc.index(SECTION)
    out: dict[str, int] = {}
    row = 0
    in_table = False
    for line in doc[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        first = line.strip("|").split("|")[0]
        if set(first.strip()) <= set("-: "):
            continue  # the separator row
        names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", first)
        if not names:
            continue  # the header row
        for name in names:
            out[name] = row
        row += 1
    return out


@dataclass(frozen=True)
class Import:
    module: str  # one of ours, by module name (``INIT`` for the package)
    line: int
    local: bool  # inside a function


def _ours(node: ast.Import | ast.ImportFrom, modules: set[str]) -> list[str]:
    """The modules of ours an import statement loads."""
    if isinstance(node, ast.Import):
        out = []
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == PACKAGE_NAME:
                out.append(parts[1] if len(parts) > 1 else INIT)
        return out
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != PACKAGE_NAME:
            return []
        base = parts[1] if len(parts) > 1 else None
    elif node.level == 1:
        base = node.module.split(".")[0] if node.module else None
    else:
        return []
    if base is not None:
        return [base]
    # ``from . import x``: the module ``x``, or a name of the package
    return [a.name if a.name in modules else INIT for a in node.names]


def _walk(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, with whether it is inside a function."""
    out: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, local))
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, False)
    return out


def _io_problems(name: str, tree: ast.AST) -> list[str]:
    problems = []
    for node, _ in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in IO_MODULES and top != "threading":
                    problems.append(f"{name}:{node.lineno}: sans-IO core imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top = (node.module or "").split(".")[0]
            if top == "threading":
                bad = [a.name for a in node.names if a.name not in THREAD_SAFE]
                if bad:
                    problems.append(f"{name}:{node.lineno}: sans-IO core imports threading.{bad[0]}")
            elif top in IO_MODULES:
                problems.append(f"{name}:{node.lineno}: sans-IO core imports from {node.module}")
    for use in ast.walk(tree):
        if (
            isinstance(use, ast.Attribute)
            and isinstance(use.value, ast.Name)
            and use.value.id == "threading"
            and use.attr not in THREAD_SAFE
        ):
            problems.append(f"{name}:{use.lineno}: sans-IO core uses threading.{use.attr}")
    return problems


def layout_problems(package: Path, doc: Path) -> list[str]:
    """What is wrong with the package in ``package`` against the table in
    ``doc``: one line per problem (empty: the layout holds)."""
    order = floors(doc.read_text())
    sources = {p.stem: p for p in sorted(package.glob("*.py"))}
    modules = set(sources)
    problems = [
        f"{name}: not in the table of {doc.name}" for name in sources if name not in order and name != INIT
    ]
    problems += [
        f"{name}: in the table of {doc.name} but not in the package" for name in order if name not in modules
    ]
    for name, path in sources.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, local in _walk(tree):
            for target in _ours(node, modules):
                where = f"{name}:{node.lineno}"
                if local:
                    problems.append(f"{where}: function-local import of {target}")
                if name == INIT or target == INIT or name not in order or target not in order:
                    continue
                if order[target] > order[name]:
                    problems.append(f"{where}: {name} imports {target}, which is above it in the table")
        if name in SANS_IO:
            problems += _io_problems(name, tree)
    return problems


# ------------------------------------------------------------------ the tests


def test_the_package_follows_its_documented_layout() -> None:
    assert layout_problems(PACKAGE, DOC) == []


def test_the_table_names_the_layers_in_order() -> None:
    order = floors(DOC.read_text())
    assert order["_ids"] == 0
    assert order["_wire"] < order["_ports"] < order["_node"] < order["_join"] < order["_mesh"]
    assert order["_child"] > order["_mesh"]  # a worker runs a Mesh
    assert order["_cli"] == order["_ctlcli"] == order["_demo"]


def _copy(tmp_path: Path) -> tuple[Path, Path]:
    pkg = tmp_path / PACKAGE_NAME
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    doc = tmp_path / "architecture.md"
    shutil.copy(DOC, doc)
    return pkg, doc


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_an_annotation_only_import_of_a_higher_module_is_reported(tmp_path: Path) -> None:
    pkg, doc = _copy(tmp_path)
    _append(
        pkg / "_wire.py",
        "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._mesh import Mesh\n",
    )
    (problem,) = layout_problems(pkg, doc)
    assert problem.startswith("_wire:") and "imports _mesh" in problem


def test_absolute_and_package_imports_of_a_higher_module_are_reported(tmp_path: Path) -> None:
    pkg, doc = _copy(tmp_path)
    _append(pkg / "_ids.py", "\nimport meshipc._node\nfrom meshipc import _tasks\nfrom . import _names\n")
    problems = layout_problems(pkg, doc)
    assert sorted(p.split(": ", 1)[1] for p in problems) == [
        f"_ids imports {m}, which is above it in the table" for m in ("_names", "_node", "_tasks")
    ]


def test_a_function_local_import_of_our_own_module_is_reported(tmp_path: Path) -> None:
    pkg, doc = _copy(tmp_path)
    _append(pkg / "_mesh.py", "\ndef _late() -> None:\n    from ._ids import NodeId\n    import json\n")
    (problem,) = layout_problems(pkg, doc)
    assert problem.startswith("_mesh:") and "function-local import of _ids" in problem


def test_io_in_a_sans_io_core_is_reported(tmp_path: Path) -> None:
    pkg, doc = _copy(tmp_path)
    _append(pkg / "_ports.py", "\nimport asyncio\nfrom selectors import DefaultSelector\n")
    _append(pkg / "_codec.py", "\n_t = threading.Thread\n")
    _append(pkg / "_handshake.py", "\nfrom threading import Thread, Lock\n")
    problems = layout_problems(pkg, doc)
    assert sorted(p.split(":")[0] + ":" + p.rsplit(" ", 1)[1] for p in problems) == [
        "_codec:threading.Thread",
        "_handshake:threading.Thread",
        "_ports:asyncio",
        "_ports:selectors",
    ]


def test_a_module_missing_from_the_table_is_reported(tmp_path: Path) -> None:
    pkg, doc = _copy(tmp_path)
    (pkg / "_extra.py").write_text('"""A new module nobody documented."""\n')
    assert layout_problems(pkg, doc) == [f"_extra: not in the table of {doc.name}"]


def test_new_rows_and_shared_floors_are_read(tmp_path: Path) -> None:
    """A new module documented in a new row (as another engineer adds one)
    passes; modules of one row may import each other, not those above."""
    pkg, doc = _copy(tmp_path)
    text = doc.read_text()
    row = "| `_mesh` |"
    assert text.count(row) == 1
    doc.write_text(text.replace(row, "| `_extra`, `_extra2` | new work | none |\n" + row))
    (pkg / "_extra.py").write_text("from ._extra2 import X\nfrom ._control import Control\n")
    (pkg / "_extra2.py").write_text("X = 1\n")
    assert layout_problems(pkg, doc) == []
    _append(pkg / "_extra2.py", "from ._mesh import Mesh\n")
    (problem,) = layout_problems(pkg, doc)
    assert problem.startswith("_extra2:")
