"""The native block products: V -> B V from csrc/products.cpp, one builder per objective.

B is the Hessian or Gauss-Newton matrix at `params`, V an (n, k) block (k = 1: one
product). Native products serve mse, quadratic, least_squares, logistic_regression and
softmax_regression (whose Gauss-Newton matrix is their Hessian) in float32/float64 on the
extension's devices: the per-point quantities (logistic weights p (1 - p), softmax
probabilities) are computed once when the product is built, so each product is two matrix
products with X. The builders serve the objectives that declare the "block_product" kernel
(`native_kernels`); whether one serves a call is chosen by `selector.resolve`, with the
dense system and the solve.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...curvature.products import BlockProduct
from ...objectives.base import Objective

Builder = Callable[[Objective, torch.Tensor, "torch.Tensor | None"], BlockProduct]


def _row_subset(objective: Objective, name: str, rows: torch.Tensor | None) -> torch.Tensor:
    t = objective.data[name]
    return t if rows is None else t.index_select(0, rows.to(t.device))


def _mse(objective: Objective, x: torch.Tensor, rows: torch.Tensor | None) -> BlockProduct:
    from .ops import ops

    target = objective.data["target"]
    return lambda v: ops.mse_block_product(target, v)


def _quadratic(objective: Objective, x: torch.Tensor, rows: torch.Tensor | None) -> BlockProduct:
    from .ops import ops

    a = objective.data["A"]
    return lambda v: ops.quadratic_block_product(a, v)


def _least_squares(
    objective: Objective, x: torch.Tensor, rows: torch.Tensor | None
) -> BlockProduct:
    from .ops import ops

    X = _row_subset(objective, "X", rows)
    l2, fit = objective.options["l2"], objective.options["fit_intercept"]
    return lambda v: ops.linear_block_product(X, None, v, l2, fit)


def _logistic(objective: Objective, x: torch.Tensor, rows: torch.Tensor | None) -> BlockProduct:
    from .ops import ops

    X = _row_subset(objective, "X", rows)
    l2, fit = objective.options["l2"], objective.options["fit_intercept"]
    weights = ops.logistic_regression_weights(x, X, fit)
    return lambda v: ops.linear_block_product(X, weights, v, l2, fit)


def _softmax(objective: Objective, x: torch.Tensor, rows: torch.Tensor | None) -> BlockProduct:
    from .ops import ops

    X = _row_subset(objective, "X", rows)
    o = objective.options
    probs = ops.softmax_regression_probs(x, X, o["num_classes"], o["fit_intercept"])
    return lambda v: ops.softmax_block_product(X, probs, v, o["l2"], o["fit_intercept"])


# objective name -> builder of its native block product (Hessian = Gauss-Newton for all)
NATIVE_PRODUCTS: dict[str, Builder] = {
    "mse": _mse,
    "quadratic": _quadratic,
    "least_squares": _least_squares,
    "logistic_regression": _logistic,
    "softmax_regression": _softmax,
}
