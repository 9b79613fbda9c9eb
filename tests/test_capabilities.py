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
from hessian_service.engine.backends.native.products import NATIVE_PRODUCTS
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
        "block_product": name in NATIVE_PRODUCTS,
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
