"""What the extension registers: the torch.ops.hessian schemas the engine calls, a CPU, a CUDA
and a fake (Meta) kernel for every op, and for every fused step a direct entry in `_C` that
takes the op's arguments and returns the op's answer bit for bit (csrc/fused_steps.h declares
each step once; fused.cpp builds the op and python_bindings.cpp the direct entry from it).
"""

from __future__ import annotations

import pytest
import torch
from native_support import F32, F64, objective_of_size, require_native

require_native()

from hessian_service import _C  # noqa: E402  (after the skip gate: _C may be missing)

ops = torch.ops.hessian

# The engine's contract with csrc/ (it calls these by name and position); written down from the
# extension as it was before csrc/ was reorganised, so a change here is a deliberate API change.
SCHEMAS = {
    "damped_cholesky": "(Tensor H, Tensor g, float damping, int max_attempts)"
    " -> (Tensor, Tensor, Tensor)",
    "saddle_free": (
        "(Tensor H, Tensor g, float eigenvalue_floor, float tolerance_factor) -> (Tensor, Tensor)"
    ),
    "gauss_newton": "(Tensor J, Tensor? weights=None) -> Tensor",
    "mse_system": "(Tensor x, Tensor target) -> (Tensor, Tensor, Tensor)",
    "quadratic_system": "(Tensor x, Tensor A, Tensor b) -> (Tensor, Tensor, Tensor)",
    "least_squares_system": "(Tensor x, Tensor X, Tensor y, float l2, bool fit_intercept)"
    " -> (Tensor, Tensor, Tensor)",
    "logistic_regression_system": "(Tensor x, Tensor X, Tensor y, float l2,"
    " bool fit_intercept) -> (Tensor, Tensor, Tensor)",
    "softmax_regression_system": "(Tensor x, Tensor X, Tensor labels, int num_classes,"
    " float l2, bool fit_intercept) -> (Tensor, Tensor, Tensor)",
    "mse_newton_step": "(Tensor x, Tensor target, float lr, float damping, int max_attempts)"
    " -> (Tensor, Tensor)",
    "quadratic_newton_step": "(Tensor x, Tensor A, Tensor b, float lr, float damping,"
    " int max_attempts) -> (Tensor, Tensor)",
    "least_squares_newton_step": "(Tensor x, Tensor X, Tensor y, float l2, bool fit_intercept,"
    " float lr, float damping, int max_attempts) -> (Tensor, Tensor)",
    "logistic_regression_newton_step": "(Tensor x, Tensor X, Tensor y, float l2,"
    " bool fit_intercept, float lr, float damping, int max_attempts) -> (Tensor, Tensor)",
    "softmax_regression_newton_step": "(Tensor x, Tensor X, Tensor labels, int num_classes,"
    " float l2, bool fit_intercept, float lr, float damping, int max_attempts)"
    " -> (Tensor, Tensor)",
    "mse_block_product": "(Tensor target, Tensor V) -> Tensor",
    "quadratic_block_product": "(Tensor A, Tensor V) -> Tensor",
    "logistic_regression_weights": "(Tensor x, Tensor X, bool fit_intercept) -> Tensor",
    "linear_block_product": "(Tensor X, Tensor? weights, Tensor V, float l2,"
    " bool fit_intercept) -> Tensor",
    "softmax_regression_probs": "(Tensor x, Tensor X, int num_classes, bool fit_intercept)"
    " -> Tensor",
    "softmax_block_product": "(Tensor X, Tensor P, Tensor V, float l2, bool fit_intercept)"
    " -> Tensor",
}
STEP_SUFFIX = "_newton_step"
STEPS = sorted(name for name in SCHEMAS if name.endswith(STEP_SUFFIX))
# what a wrong Python type for each schema type is told it must be
EXPECTED = {"Tensor": "a Tensor", "float": "a real number", "int": "an integer", "bool": "a bool"}


def _registered() -> list[str]:
    """Names of every operator the loaded library registered under hessian::."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1] for n in names if n.startswith("hessian::"))


def _schema(name: str) -> torch._C.FunctionSchema:
    return getattr(ops, name).default._schema


def test_registered_ops_have_the_engine_schemas():
    assert _registered() == sorted(SCHEMAS)
    for name, signature in SCHEMAS.items():
        assert str(_schema(name)) == f"hessian::{name}{signature}"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_op_has_cpu_cuda_and_fake_kernels(name):
    qualname = f"hessian::{name}"
    for key in ("CPU", "CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (qualname, key)
    fake = torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel
    assert fake is not None, qualname


def test_direct_entries_are_exactly_the_fused_steps():
    direct = sorted(name for name in dir(_C) if not name.startswith("_"))
    assert direct == STEPS


def _step_args(name: str, dtype: torch.dtype) -> tuple:
    """Random (x, *data, *options, lr, damping, max_attempts) for the fused step `name`."""
    kind = name.removesuffix(STEP_SUFFIX)
    objective = objective_of_size(kind, 25, dtype)
    data, opts = objective.data, objective.options
    if kind == "mse":
        data_args = (data["target"],)
    elif kind == "quadratic":
        data_args = (data["A"], data["b"])
    elif kind == "softmax_regression":
        data_args = (data["X"], data["labels"], opts["num_classes"], opts["l2"])
        data_args += (opts["fit_intercept"],)
    else:
        data_args = (data["X"], data["y"], opts["l2"], opts["fit_intercept"])
    x = 0.3 * torch.randn(25, dtype=dtype)
    return (x, *data_args, 0.7, 0.05, 60)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("name", STEPS)
def test_direct_entry_matches_the_op_bit_for_bit(name, dtype):
    args = _step_args(name, dtype)
    assert len(args) == len(_schema(name).arguments)
    x_op, stats_op = getattr(ops, name)(*args)
    x_direct, stats_direct = getattr(_C, name)(*args)
    assert x_direct.dtype == dtype and torch.equal(x_direct, x_op)
    assert stats_direct == tuple(stats_op.tolist())
    assert all(type(s) is float for s in stats_direct)


@pytest.mark.parametrize("name", STEPS)
def test_direct_entry_names_a_wrong_argument_from_the_schema(name):
    args = _step_args(name, F64)
    entry = getattr(_C, name)
    arity = len(args)
    with pytest.raises(TypeError, match=f"^{name} takes {arity} arguments, got {arity - 1}$"):
        entry(*args[:-1])
    for i, argument in enumerate(_schema(name).arguments):
        bad = list(args)
        bad[i] = "not a value"
        expected = f"^{argument.name} must be {EXPECTED[str(argument.type)]}$"
        with pytest.raises(TypeError, match=expected):
            entry(*bad)


def test_fake_rules_serve_their_ops_by_schema_name_and_refuse_an_op_without_the_argument():
    from hessian_service.engine.backends.native.ops import FAKE_RULES, fake_from_rule
    from torch._subclasses.fake_tensor import FakeTensorMode

    ruled = [n for n in SCHEMAS if any(n.endswith(suffix) for suffix in FAKE_RULES)]
    assert len(ruled) == 14  # 5 systems, 5 fused steps, 4 block products
    X, v = torch.randn(30, 5, dtype=F64), torch.randn(5, 3, dtype=F64)
    kwargs = {"X": X, "weights": None, "V": v, "l2": 0.1, "fit_intercept": False}
    real = ops.linear_block_product(**kwargs)
    with FakeTensorMode() as mode:
        fake = ops.linear_block_product(
            **{
                k: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                for k, t in kwargs.items()
            }
        )
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype)
    with pytest.raises(TypeError, match=r"^hessian::damped_cholesky takes no argument 'V'"):
        fake_from_rule("damped_cholesky", "V", lambda t: t)
