"""`rosenbrock`: sum 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2, minimum 0 at all ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..validation import option_int
from .base import Objective


class Rosenbrock(Objective):
    """The n-dimensional Rosenbrock function (option `dim`, default 2); data-free."""

    name = "rosenbrock"
    option_names = ("dim",)

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        dim = option_int(options, "dim", 2, minimum=2)
        self.options = {"dim": dim}
        self.param_shape = (dim,)

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        x0, x1 = params[:-1], params[1:]
        return torch.sum(100.0 * (x1 - x0**2) ** 2 + (1.0 - x0) ** 2)

    def init_params(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The classic start: -1.2 at even indices, 1 at odd ones."""
        x = torch.ones(self.num_params, dtype=torch.float64)
        x[0::2] = -1.2
        return x
