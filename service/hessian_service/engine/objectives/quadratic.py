"""`quadratic`: 0.5 x^T A x - b^T x with A symmetric (its Hessian is A)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ValidationError
from ..validation import require_same_dtype, require_tensor
from .base import NATIVE_KERNELS, Objective


class Quadratic(Objective):
    """A quadratic model; A must be square and symmetric (to 1e-10 relative), b matches it."""

    name = "quadratic"
    data_fields = ("A", "b")
    native_kernels = NATIVE_KERNELS

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        a = require_tensor(data, "A", ndim=2)
        if a.shape[0] != a.shape[1]:
            raise ValidationError("data.A", "a square matrix", f"shape {tuple(a.shape)}")
        b = require_tensor(data, "b", ndim=1)
        require_same_dtype("data.b", b, a.dtype)
        if b.shape[0] != a.shape[0]:
            raise ValidationError("data.b", f"length {a.shape[0]} to match data.A", f"{b.shape[0]}")
        scale = float(a.abs().max())
        tol = (1e-10 if a.dtype == torch.float64 else 1e-5) * max(scale, 1.0)
        if float((a - a.T).abs().max()) > tol:
            raise ValidationError("data.A", "a symmetric matrix", "an asymmetric one")
        self.data = {"A": (a + a.T) / 2, "b": b}
        self.dtype = a.dtype
        self.param_shape = (a.shape[0],)

    def native_args(self) -> tuple[Any, ...]:
        return self.data["A"], self.data["b"]

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        a, b = self.data["A"], self.data["b"]
        return 0.5 * params @ (a @ params) - b @ params
