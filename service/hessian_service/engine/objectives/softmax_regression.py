"""`softmax_regression`: multinomial cross-entropy of Z = [X, 1] W plus 0.5 l2 ||W[:d]||^2
(losses.cross_entropy: without cancellation where a label's class is near certain)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ValidationError
from ..validation import option_bool, option_float, option_int, require_tensor
from .base import NATIVE_KERNELS, Objective, check_forward_values
from .losses import cross_entropy, l2_penalty


class SoftmaxRegression(Objective):
    """Softmax regression on X (N, d), labels (N,) int64 in [0, k); params (d + intercept, k).

    The parameter matrix is row-major (flat index = feature_row * k + class) with the
    intercept row last; the intercept row is not penalised. The loss is unchanged by adding
    one number to every class of an unpenalised row (the intercepts; every row when
    l2 = 0): its Hessian is singular there, and `project_step` removes that gauge
    component from every dense step, so the rows keep their starting class mean (zero
    from the default start: centred, as scikit-learn centres its multinomial intercepts).
    """

    name = "softmax_regression"
    data_fields = ("X", "labels")
    option_names = ("num_classes", "l2", "fit_intercept")
    supports_ggn = True
    convex = True
    row_fields = ("X", "labels")
    native_kernels = NATIVE_KERNELS
    native_product_op = "softmax_block_product"
    native_product_inputs = (("P", "softmax_regression_probs"),)

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        x = require_tensor(data, "X", ndim=2)
        labels = require_tensor(data, "labels", ndim=1, kind="int")
        if labels.shape[0] != x.shape[0]:
            raise ValidationError(
                "data.labels", f"length {x.shape[0]} to match data.X", labels.shape[0]
            )
        k = option_int(options, "num_classes", None, minimum=2)
        lo, hi = int(labels.min()), int(labels.max())
        if k is None:
            k = max(hi + 1, 2)
        if lo < 0 or hi >= k:
            raise ValidationError("data.labels", f"integers in [0, {k})", f"range [{lo}, {hi}]")
        check_forward_values(x.shape[0], k, "options.num_classes", "classes")
        l2 = option_float(options, "l2", 0.0, minimum=0.0)
        fit_intercept = option_bool(options, "fit_intercept", True)
        self.data = {"X": x, "labels": labels}
        self.options = {"num_classes": k, "l2": l2, "fit_intercept": fit_intercept}
        self.dtype = x.dtype
        self._d = x.shape[1]
        self._k = k
        self.param_shape = (self._d + int(fit_intercept), k)

    def check_rows(self, rows: int, field: str) -> None:
        """Rows x classes of logits, bounded."""
        check_forward_values(rows, self._k, field, "classes")

    def native_args(self) -> tuple[Any, ...]:
        o = self.options
        return self.data["X"], self.data["labels"], o["num_classes"], o["l2"], o["fit_intercept"]

    @property
    def has_gauge(self) -> bool:
        """Unpenalised rows exist: every row when l2 = 0, else the intercept row (with
        l2 > 0 and no intercept project_step is the identity)."""
        return self.options["l2"] == 0 or self.options["fit_intercept"]

    def project_step(self, step: torch.Tensor) -> torch.Tensor:
        """The step with each unpenalised row's class mean removed (the gauge directions)."""
        first = 0 if self.options["l2"] == 0 else self._d
        if first >= self.param_shape[0]:
            return step
        rows = step.reshape(self.param_shape)[first:]
        out = step.clone().reshape(self.param_shape)
        out[first:] = rows - rows.mean(dim=1, keepdim=True)
        return out.reshape(step.shape)

    def outputs(self, params: torch.Tensor) -> torch.Tensor:
        w = params.reshape(self.param_shape)
        z = self.data["X"] @ w[: self._d]
        if self.options["fit_intercept"]:
            z = z + w[self._d]
        return z

    def output_loss(self, outputs: torch.Tensor) -> torch.Tensor:
        return cross_entropy(outputs, self.data["labels"])

    def regulariser(self, params: torch.Tensor) -> torch.Tensor:
        w = params.reshape(-1)[: self._d * self._k]  # the penalised feature rows
        return l2_penalty(w, self.options["l2"])

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        return self.output_loss(self.outputs(params)) + self.regulariser(params)
