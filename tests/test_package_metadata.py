"""The server's package metadata declares what its code imports (issue 12 item 3).

Every third-party module that service/hessian_service imports (read with ast) must belong to
a distribution the installed hessian-service metadata requires: at module level a plain
requirement, inside a function (an optional feature) at least an extra. torch is pinned
exactly as requirements/torch.txt pins it, never a range that could pull a CUDA build.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import pathlib
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "service" / "hessian_service"


class _Imports(ast.NodeVisitor):
    """Absolute imports of one module: {dotted name: imported inside a function}."""

    def __init__(self) -> None:
        self.found: dict[str, bool] = {}
        self._depth = 0

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, name: str) -> None:
        self.found[name] = self.found.get(name, True) and self._depth > 0

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module)


def third_party_imports() -> dict[str, bool]:
    """{module: only imported inside functions} over every file of hessian_service."""
    out: dict[str, bool] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for name, lazy in visitor.found.items():
            top = name.partition(".")[0]
            if top in sys.stdlib_module_names or top == "hessian_service":
                continue
            out[name] = out.get(name, True) and lazy
    return out


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level import name -> the installed distributions providing it (slow: cached)."""
    return importlib.metadata.packages_distributions()


def owning_distribution(module: str) -> str:
    """The installed distribution whose files hold `module` (namespaces like google.* too)."""
    top, _, rest = module.partition(".")
    candidates = _distributions().get(top, [])
    if len(set(candidates)) == 1:
        return canonicalize_name(candidates[0])
    # a namespace package (google.protobuf, google.rpc): the one shipping the subpackage
    prefix = f"{top}/{rest.partition('.')[0]}/"
    owners = {
        canonicalize_name(name)
        for name in candidates
        if any(str(f).startswith(prefix) for f in importlib.metadata.files(name) or ())
    }
    assert len(owners) == 1, f"{module}: owned by {owners or candidates}"
    return owners.pop()


def declared() -> tuple[dict[str, Requirement], dict[str, Requirement]]:
    """(required, extras) of the installed hessian-service metadata, by canonical name."""
    required, extras = {}, {}
    for line in importlib.metadata.requires("hessian-service") or []:
        req = Requirement(line)
        target = extras if req.marker is not None and "extra" in str(req.marker) else required
        target[canonicalize_name(req.name)] = req
    return required, extras


def test_every_imported_third_party_module_is_declared():
    required, extras = declared()
    imports = third_party_imports()
    assert {"grpc", "google.protobuf.message", "torch", "hessian_client.proto"} <= set(imports)
    missing: dict[str, str] = {}  # distribution: a module of it the code imports
    for module, lazy in sorted(imports.items()):
        if importlib.util.find_spec(module.partition(".")[0]) is None:
            missing[module] = "not installed"
            continue
        dist = owning_distribution(module)
        if dist not in required and not (lazy and dist in extras):
            missing.setdefault(dist, module)
    assert not missing, f"hessian-service's install_requires lacks: {missing}"


def test_torch_is_pinned_exactly_as_requirements_torch_txt():
    required, _ = declared()
    lines = (ROOT / "requirements" / "torch.txt").read_text().splitlines()
    (pin,) = [Requirement(x) for x in lines if x.strip() and not x.startswith("#")]
    assert canonicalize_name(pin.name) == "torch"
    assert str(required["torch"].specifier) == str(pin.specifier)
    (spec,) = pin.specifier
    assert spec.operator == "=="


@pytest.mark.parametrize("module", ["torch", "grpc", "hessian_client"])
def test_owning_distribution_resolves_known_modules(module):
    expected = {"torch": "torch", "grpc": "grpcio", "hessian_client": "hessian-client"}
    assert owning_distribution(module) == expected[module]
