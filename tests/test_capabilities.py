"""Each objective declares its own capabilities, and the one selector reads them from there.

The declared native kernels must match what the extension and the native backend provide
(no objective declares a kernel that is missing, none has one it does not declare). A
subclass that declares fewer kernels than its parent must be served by the fallback the
selector picks from the declaration alone (the name is the parent's), and its Newton step
must still equal a float64 torch.func reference.
"""

from __future__ import annotations

import pytest
import torch
from hessian_service import _C
from hessian_service.engine import OBJECTIVES, MethodOptions, make_objective, take_step
from hessian_service.engine.backends import selector
from hessian_service.engine.backends.native.products import block_product_ops
from hessian_service.engine.objectives.base import NATIVE_KERNELS
from hessian_service.engine.objectives.least_squares import LeastSquares
from hessian_service.engine.objectives.mlp import MLP
from native_support import require_native

require_native()
F64 = torch.float64


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_declared_native_kernels_are_exactly_those_provided(name):
    cls = OBJECTIVES[name]
    assert cls.native_kernels <= NATIVE_KERNELS
    provided = {
        "system": hasattr(torch.ops.hessian, f"{name}_system"),
        "newton_step": hasattr(_C, f"{name}_newton_step"),
        "block_product": all(hasattr(torch.ops.hessian, op) for op in block_product_ops(cls)),
    }
    assert {k for k, present in provided.items() if present} == set(cls.native_kernels)


def _least_squares(cls: type[LeastSquares]) -> LeastSquares:
    x, y = torch.randn(40, 5, dtype=F64), torch.randn(40, dtype=F64)
    return cls({"X": x, "y": y}, {"l2": 0.1, "fit_intercept": True})


class _NoKernels(LeastSquares):
    native_kernels = frozenset()


class _SystemOnly(LeastSquares):
    native_kernels = frozenset({"system"})


class _NoClosedForm(MLP):
    closed_form_system = False


@pytest.mark.parametrize(
    ("cls", "system", "products", "fused"),
    [
        (LeastSquares, "native", "native", True),
        (_NoKernels, "autograd", "autograd", False),
        (_SystemOnly, "native", "autograd", False),
    ],
)
def test_the_selector_follows_the_declaration_not_the_name(cls, system, products, fused):
    obj = _least_squares(cls)
    assert obj.name == "least_squares"
    x = torch.randn(obj.num_params, dtype=F64)
    chosen = selector.resolve("native", obj, x, "hessian")
    assert (chosen.system.name, chosen.solver.name, chosen.products) == (system, "native", products)
    assert (selector.fused_entry(obj) is not None) is fused

    options = MethodOptions(method="newton", step_policy="fixed", learning_rate=1.0)
    result = take_step(obj, x, options)
    h = torch.func.hessian(obj.loss)(x)
    g = torch.func.grad(obj.loss)(x)
    want = x - torch.linalg.solve(h, g)
    assert float((result.params - want).norm() / want.norm()) <= 1e-10
    expected = "native" if system == "native" else "autograd+native-solve"
    assert result.record.backend == expected


def test_an_mlp_without_its_closed_form_is_assembled_by_autograd():
    data = {"X": torch.randn(12, 3, dtype=F64), "y": torch.randn(12, 2, dtype=F64)}
    options = {"layer_sizes": [3, 4, 2], "activation": "tanh"}
    plain = make_objective("mlp", data, options)
    bare = _NoClosedForm(data, options)
    x = plain.init_params(torch.Generator().manual_seed(0))
    assert selector.resolve("auto", plain, x, "hessian").system.name == "closed_form"
    assert selector.resolve("auto", bare, x, "hessian").system.name == "autograd"


class _Ridge(LeastSquares):
    """A new objective name whose native products come from its declaration alone."""

    name = "ridge"
    native_kernels = frozenset({"block_product"})


@pytest.mark.parametrize("rows", [None, torch.tensor([0, 3, 7, 21])])
def test_an_objective_new_to_the_backend_gets_native_products_from_its_declaration(rows):
    obj = _least_squares(_Ridge)
    x = torch.randn(obj.num_params, dtype=F64)
    v = torch.randn(obj.num_params, 3, dtype=F64)
    product, label = selector.curvature_block_product(obj, x, "native", rows)
    assert label == "native"
    sub = obj if rows is None else obj.subsample(rows)
    want = torch.func.hessian(sub.loss)(x) @ v  # float64 autograd reference
    assert float((product(v) - want).norm() / want.norm()) <= 1e-12


def test_unknown_native_kernels_are_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"_Typo\.native_kernels: .*unknown \['block_products'\]"):

        class _Typo(LeastSquares):
            native_kernels = frozenset({"system", "block_products"})


def test_kernels_called_with_native_args_need_native_args():
    with pytest.raises(TypeError, match=r"declares \['system'\].*does not define native_args"):

        class _Bare(MLP):
            native_kernels = frozenset({"system"})


class _MissingSystem(LeastSquares):
    name = "ridge"
    native_kernels = frozenset({"system"})


class _MissingStep(LeastSquares):
    name = "ridge"
    native_kernels = frozenset({"newton_step"})


class _MissingProductOp(LeastSquares):
    native_product_op = "least_squares_block_product"


class _UnboundProductArgument(LeastSquares):
    native_product_op = "softmax_block_product"  # takes P, which nothing supplies here


@pytest.mark.parametrize(
    ("cls", "kernel", "missing"),
    [
        (_MissingSystem, "system", "the extension has no hessian::ridge_system$"),
        (_MissingStep, "newton_step", r"the extension has no _C\.ridge_newton_step$"),
        (
            _MissingProductOp,
            "block_product",
            "the extension has no hessian::least_squares_block_product$",
        ),
        (_UnboundProductArgument, "block_product", "hessian::softmax_block_product takes 'P'"),
    ],
)
def test_a_declared_kernel_the_extension_lacks_is_refused_at_first_use(cls, kernel, missing):
    obj = _least_squares(cls)
    x = torch.randn(obj.num_params, dtype=F64)
    first_use = {
        "system": lambda: take_step(obj, x, MethodOptions(method="newton", backend="native")),
        "newton_step": lambda: selector.fused_entry(obj),
        "block_product": lambda: selector.curvature_products(obj, x, "native").block(),
    }
    expected = rf"^{cls.__name__} declares the native kernel '{kernel}' but {missing}"
    with pytest.raises(TypeError, match=expected):
        first_use[kernel]()


def test_the_dense_assembler_is_chosen_only_when_the_system_is_read(monkeypatch):
    calls = []
    real = selector._assembler
    monkeypatch.setattr(selector, "_assembler", lambda *a: calls.append(a) or real(*a))
    obj = _least_squares(LeastSquares)
    x = torch.randn(obj.num_params, dtype=F64)
    result = take_step(obj, x, MethodOptions(method="newton_cg", backend="native"))
    assert result.record.backend == "native" and calls == []  # Hessian-free: products only
    chosen = selector.resolve("native", obj, x, "hessian")
    assert chosen.products == "native" and calls == []
    assert chosen.system.name == "native" and chosen.system is chosen.system
    assert len(calls) == 1
