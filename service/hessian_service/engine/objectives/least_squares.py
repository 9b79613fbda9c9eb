"""`least_squares`: 0.5 mean((X w + b - y)^2) + 0.5 l2 ||w||^2, intercept last and unpenalised."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ValidationError
from ..validation import option_bool, option_float, require_same_dtype, require_tensor
from .base import NATIVE_KERNELS, Objective
from .losses import l2_penalty


class LeastSquares(Objective):
    """Linear least squares on data X (N, d), y (N,); params (d + fit_intercept,)."""

    name = "least_squares"
    data_fields = ("X", "y")
    option_names = ("l2", "fit_intercept")
    supports_ggn = True
    convex = True
    row_fields = ("X", "y")
    native_kernels = NATIVE_KERNELS
    native_product_op = "linear_block_product"

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        x = require_tensor(data, "X", ndim=2)
        y = require_tensor(data, "y", ndim=1)
        require_same_dtype("data.y", y, x.dtype)
        if y.shape[0] != x.shape[0]:
            raise ValidationError("data.y", f"length {x.shape[0]} to match data.X", y.shape[0])
        l2 = option_float(options, "l2", 0.0, minimum=0.0)
        fit_intercept = option_bool(options, "fit_intercept", False)
        self.data = {"X": x, "y": y}
        self.options = {"l2": l2, "fit_intercept": fit_intercept}
        self.dtype = x.dtype
        self._d = x.shape[1]
        self.param_shape = (self._d + int(fit_intercept),)

    def native_args(self) -> tuple[Any, ...]:
        o = self.options
        return self.data["X"], self.data["y"], o["l2"], o["fit_intercept"]

    def outputs(self, params: torch.Tensor) -> torch.Tensor:
        out = self.data["X"] @ params[: self._d]
        if self.options["fit_intercept"]:
            out = out + params[self._d]
        return out

    def output_loss(self, outputs: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.mean((outputs - self.data["y"]) ** 2)

    def regulariser(self, params: torch.Tensor) -> torch.Tensor:
        return l2_penalty(params[: self._d], self.options["l2"])

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        return self.output_loss(self.outputs(params)) + self.regulariser(params)
