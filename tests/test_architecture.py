"""Imports flow one way: no circle anywhere, no import of a higher layer or a sibling group.

Every module under service/hessian_service and client/hessian_client is read with `ast`
(nothing is imported): module-level and function-level imports, absolute and relative. The
layer table and the refused imports are parsed from ARCHITECTURE.md, where they are written
once. The checker itself is tested on a planted package with a circle and an upward import,
so a checker that found nothing would fail here too.
"""

from __future__ import annotations

import ast
import pathlib
import re
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {
    "hessian_service": ROOT / "service" / "hessian_service",
    "hessian_client": ROOT / "client" / "hessian_client",
}
NATIVE = "hessian_service._C"  # the compiled extension: a module without Python source


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to a module name."""

    importer: str
    target: str
    line: int
    top_level: bool


def modules_of(packages: dict[str, pathlib.Path]) -> dict[str, tuple[pathlib.Path, bool]]:
    """Module name -> (source path, is a package), for every .py file under the packages."""
    found = {}
    for name, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            package = parts[-1] == "__init__"
            if package:
                parts.pop()
            found[".".join(parts)] = (path, package)
    return found


def _closest(name: str, known: set[str]) -> str:
    """`name` itself when it is a known module, else its nearest known parent, else `name`."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return name


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes that run when the module is imported (not inside a def)."""
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    return {id(n) for n in ast.walk(tree) if id(n) not in nested}


def imports_of(packages: dict[str, pathlib.Path]) -> list[Import]:
    """Every import of every module, targets resolved to known modules where they are ours."""
    modules = modules_of(packages)
    known = set(modules) | {NATIVE}
    result = []
    for name, (path, package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        top = _top_level_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [_closest(alias.name, known) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if package else name.split(".")[:-1]
                    anchor = here[: len(here) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in known else _closest(base, known))
            else:
                continue
            for target in targets:
                result.append(Import(name, target, node.lineno, id(node) in top))
    return result


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a -> b -> ... -> a) in the graph, or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def _blocks(section: str) -> list[str]:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"ARCHITECTURE.md has no section {section!r}"
    return re.findall(r"^```text\n(.*?)^```", match.group(1), re.S | re.M)


def layer_table() -> dict[str, tuple[int, str]]:
    """Module prefix -> (layer, group), from ARCHITECTURE.md's layer table."""
    table = {}
    for line in _blocks("Import layers")[0].splitlines():
        layer, group, *prefixes = line.split()
        for prefix in prefixes:
            table[prefix] = (int(layer), group)
    return table


def refused_imports() -> dict[str, list[str]]:
    """Importer prefix -> the module prefixes it may not import, from ARCHITECTURE.md."""
    return {line.split()[0]: line.split()[1:] for line in _blocks("Import layers")[1].splitlines()}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def place(name: str, table: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    """The (layer, group) of a module: its longest matching prefix in the table."""
    matches = [p for p in table if _under(name, p)]
    return table[max(matches, key=len)] if matches else None


def layer_violations(imports: list[Import], table: dict[str, tuple[int, str]]) -> list[str]:
    """Imports of a higher layer, or of another group of the same layer."""
    bad = []
    for imp in imports:
        src, dst = place(imp.importer, table), place(imp.target, table)
        if src is None or dst is None or src[1] == dst[1]:
            continue
        if dst[0] >= src[0]:
            bad.append(
                f"{imp.importer}:{imp.line} ({src[1]}, layer {src[0]}) imports {imp.target} "
                f"({dst[1]}, layer {dst[0]})"
            )
    return bad


def internal_edges(imports: list[Import], packages: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (the graph a circle is looked for in)."""
    known = set(modules_of(packages))
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target in known and imp.target != imp.importer:
            edges.setdefault(imp.importer, set()).add(imp.target)
    return edges


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return imports_of(PACKAGES)


def test_there_is_no_import_circle(imports):
    cycle = find_cycle(internal_edges(imports, PACKAGES))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer_or_a_sibling(imports):
    table = layer_table()
    modules = modules_of(PACKAGES)
    unplaced = [m for m in modules if m.startswith("hessian_service.") and place(m, table) is None]
    assert not unplaced, f"modules missing from ARCHITECTURE.md's layer table: {unplaced}"
    assert layer_violations(imports, table) == []


def test_refused_imports_are_absent(imports):
    refused = refused_imports()
    bad = [
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in imports
        for importer, targets in refused.items()
        if _under(imp.importer, importer) and any(_under(imp.target, t) for t in targets)
    ]
    assert bad == []


def test_the_client_imports_torch_only_inside_functions(imports):
    bad = [
        f"{imp.importer}:{imp.line}"
        for imp in imports
        if _under(imp.importer, "hessian_client") and _under(imp.target, "torch") and imp.top_level
    ]
    assert bad == []


def test_every_engine_module_is_in_the_architecture_tree():
    """ARCHITECTURE.md's tree names each engine module file (one line per module)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    engine = PACKAGES["hessian_service"] / "engine"
    missing = [
        str(p.relative_to(engine))
        for p in engine.rglob("*.py")
        if p.name != "__init__.py" and not re.search(rf"\b{re.escape(p.name)}\b", text)
    ]
    assert missing == []


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_a_planted_circle_and_upward_import(tmp_path):
    """A package with a function-level circle and relative upward imports is caught."""
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from ..high import b\n",
        "high/__init__.py": "",
        "high/b.py": "from ..low import a\nfrom . import c\n",
        "high/c.py": "x = 1\n",
        "side/d.py": "import pkg.high.c\n",
    }
    _write(tmp_path / "pkg", files)
    packages = {"pkg": tmp_path / "pkg"}
    imports = imports_of(packages)
    cycle = find_cycle(internal_edges(imports, packages))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.low.a", "pkg.high.b"}
    table = {"pkg.low": (0, "low"), "pkg.high": (1, "high"), "pkg.side": (1, "side")}
    bad = layer_violations(imports, table)
    assert len(bad) == 2
    assert bad[0].startswith("pkg.low.a:2 (low, layer 0) imports pkg.high.b")
    assert bad[1].startswith("pkg.side.d:1 (side, layer 1) imports pkg.high.c")
    function_level = [i for i in imports if i.importer == "pkg.low.a"]
    assert [i.top_level for i in function_level] == [False]
