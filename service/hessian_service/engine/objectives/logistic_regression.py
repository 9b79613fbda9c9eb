"""`logistic_regression`: mean(softplus(z) - y z) + 0.5 l2 ||w||^2 with z = X w + b,
computed as mean(softplus((1 - 2y) z)) (the same for y in {0, 1}): softplus(z) - z cancels
to 0 where the label's class is certain (float32 past z of about 17), and with it the
gradient sigmoid(z) - 1; softplus(-z) and its derivatives do not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ValidationError
from ..validation import option_bool, option_float, require_same_dtype, require_tensor
from .base import NATIVE_KERNELS, Objective
from .losses import l2_penalty


def _binary_labels(data: Mapping[str, Any], x: torch.Tensor) -> torch.Tensor:
    """data["y"] as 0/1 values in X's dtype; int64 or X's float dtype accepted."""
    field = "data.y"
    if "y" not in data:
        raise ValidationError(field, "a tensor", "nothing")
    y = data["y"]
    if not isinstance(y, torch.Tensor):
        raise ValidationError(field, "a torch.Tensor", type(y).__name__)
    if y.dim() != 1:
        raise ValidationError(field, "1 dimensions", f"shape {tuple(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValidationError(field, f"length {x.shape[0]} to match data.X", y.shape[0])
    if y.dtype != torch.int64:
        if not y.is_floating_point():
            raise ValidationError(field, f"dtype int64 or {x.dtype} (labels in {{0, 1}})", y.dtype)
        require_same_dtype(field, y, x.dtype)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValidationError(field, "labels in {0, 1}", "other values")
    return y.to(x.dtype)


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z) exactly (F.softplus linearises above 20), with derivatives of every order
    finite: max(z, 0) + log1p(e^-|z|), each branch fed only the inputs it takes (logaddexp's
    own second derivative overflows to NaN at |z| of about 710, where the loss is finite)."""
    positive = z > 0
    above = torch.where(positive, z, 0.0)
    below = torch.where(positive, 0.0, z)
    return torch.where(
        positive, above + torch.log1p(torch.exp(-above)), torch.log1p(torch.exp(below))
    )


class LogisticRegression(Objective):
    """Binary logistic regression on X (N, d), y (N,) in {0, 1}; params (d + fit_intercept,)."""

    name = "logistic_regression"
    data_fields = ("X", "y")
    option_names = ("l2", "fit_intercept")
    supports_ggn = True
    convex = True
    row_fields = ("X", "y")
    native_kernels = NATIVE_KERNELS
    native_product_op = "linear_block_product"
    native_product_inputs = (("weights", "logistic_regression_weights"),)

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        x = require_tensor(data, "X", ndim=2)
        y = _binary_labels(data, x)
        l2 = option_float(options, "l2", 0.0, minimum=0.0)
        fit_intercept = option_bool(options, "fit_intercept", True)
        self.data = {"X": x, "y": y}
        self.options = {"l2": l2, "fit_intercept": fit_intercept}
        self.dtype = x.dtype
        self._d = x.shape[1]
        self.param_shape = (self._d + int(fit_intercept),)

    def native_args(self) -> tuple[Any, ...]:
        o = self.options
        return self.data["X"], self.data["y"], o["l2"], o["fit_intercept"]

    def outputs(self, params: torch.Tensor) -> torch.Tensor:
        z = self.data["X"] @ params[: self._d]
        if self.options["fit_intercept"]:
            z = z + params[self._d]
        return z

    def output_loss(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.mean(softplus((1 - 2 * self.data["y"]) * outputs))

    def regulariser(self, params: torch.Tensor) -> torch.Tensor:
        return l2_penalty(params[: self._d], self.options["l2"])

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        return self.output_loss(self.outputs(params)) + self.regulariser(params)
