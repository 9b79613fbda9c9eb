"""`mse`: the seed's objective, mean((params - target)^2) with params shaped like target."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..validation import require_tensor
from .base import NATIVE_KERNELS, Objective


class MSE(Objective):
    """Mean squared error between the parameters and a fixed target (nn.MSELoss, mean)."""

    name = "mse"
    data_fields = ("target",)
    supports_ggn = True
    convex = True
    native_kernels = NATIVE_KERNELS
    native_step_any_shape = True

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        target = require_tensor(data, "target")
        self.data = {"target": target}
        self.dtype = target.dtype
        self.param_shape = tuple(target.shape)

    def native_args(self) -> tuple[Any, ...]:
        return (self.data["target"],)

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        return self.output_loss(self.outputs(params))

    def outputs(self, params: torch.Tensor) -> torch.Tensor:
        return params

    def output_loss(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.mean((outputs - self.data["target"].reshape(-1)) ** 2)

    def init_params(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform [0, 1) draws, as the seed's torch.rand."""
        return torch.rand(self.num_params, generator=generator, dtype=self.dtype)
