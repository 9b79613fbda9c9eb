"""Loads the compiled extension `hessian_service._C` and registers its fake (meta) kernels.

Importing this module raises whatever the import of `_C` raises (missing build, ABI
mismatch), so the backend selection can log the real reason. The ops live under
`torch.ops.hessian`; the fake kernels below give their output shapes and dtypes for
torch.compile, FakeTensor and `torch.library.opcheck`.
"""

from __future__ import annotations

import torch

from .... import _C  # noqa: F401  (loading the library registers torch.ops.hessian.*)

ops = torch.ops.hessian


def _system_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    return x.new_empty(()), x.new_empty((n,)), x.new_empty((n, n))


# loss, |g|, max|g|, step norm, damping, attempts, finite, slope (csrc/fused_steps.h)
FUSED_STATS = 8


def _step_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((x.numel(),)), torch.empty(FUSED_STATS, dtype=torch.float64)


@torch.library.register_fake("hessian::damped_cholesky")
def _(h, g, damping, max_attempts):
    return (
        g.new_empty(g.shape),
        h.new_empty((), dtype=torch.float64),
        h.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("hessian::saddle_free")
def _(h, g, eigenvalue_floor):
    return g.new_empty(g.shape), h.new_empty((), dtype=torch.int64)


@torch.library.register_fake("hessian::mse_system")
def _(x, target):
    return _system_fake(x)


@torch.library.register_fake("hessian::quadratic_system")
def _(x, a, b):
    return _system_fake(x)


@torch.library.register_fake("hessian::least_squares_system")
def _(x, X, y, l2, fit_intercept):
    return _system_fake(x)


@torch.library.register_fake("hessian::logistic_regression_system")
def _(x, X, y, l2, fit_intercept):
    return _system_fake(x)


@torch.library.register_fake("hessian::softmax_regression_system")
def _(x, X, labels, num_classes, l2, fit_intercept):
    return _system_fake(x)


@torch.library.register_fake("hessian::gauss_newton")
def _(jac, weights=None):
    n = jac.shape[1]
    return jac.new_empty((n, n))


@torch.library.register_fake("hessian::mse_newton_step")
def _(x, target, lr, damping, max_attempts):
    return _step_fake(x)


@torch.library.register_fake("hessian::quadratic_newton_step")
def _(x, a, b, lr, damping, max_attempts):
    return _step_fake(x)


@torch.library.register_fake("hessian::least_squares_newton_step")
def _(x, X, y, l2, fit_intercept, lr, damping, max_attempts):
    return _step_fake(x)


@torch.library.register_fake("hessian::logistic_regression_newton_step")
def _(x, X, y, l2, fit_intercept, lr, damping, max_attempts):
    return _step_fake(x)


@torch.library.register_fake("hessian::softmax_regression_newton_step")
def _(x, X, labels, num_classes, l2, fit_intercept, lr, damping, max_attempts):
    return _step_fake(x)


# ---------------------------------------------------------------- curvature block products


@torch.library.register_fake("hessian::mse_block_product")
def _(target, V):
    return V.new_empty(V.shape)


@torch.library.register_fake("hessian::quadratic_block_product")
def _(a, V):
    return V.new_empty(V.shape)


@torch.library.register_fake("hessian::logistic_regression_weights")
def _(x, X, fit_intercept):
    return X.new_empty((X.shape[0],))


@torch.library.register_fake("hessian::linear_block_product")
def _(X, weights, V, l2, fit_intercept):
    return V.new_empty(V.shape)


@torch.library.register_fake("hessian::softmax_regression_probs")
def _(x, X, num_classes, fit_intercept):
    return X.new_empty((X.shape[0], num_classes))


@torch.library.register_fake("hessian::softmax_block_product")
def _(X, P, V, l2, fit_intercept):
    return V.new_empty(V.shape)
