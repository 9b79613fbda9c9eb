"""The objectives: the catalogue (one module each) and exported programs, registered by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UnknownNameError
from .base import Objective
from .exported import Exported
from .least_squares import LeastSquares
from .logistic_regression import LogisticRegression
from .mlp import MLP
from .mse import MSE
from .quadratic import Quadratic
from .rosenbrock import Rosenbrock
from .softmax_regression import SoftmaxRegression

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        MSE,
        LeastSquares,
        LogisticRegression,
        SoftmaxRegression,
        MLP,
        Rosenbrock,
        Quadratic,
        Exported,
    )
}


def make_objective(
    name: str,
    data: Mapping[str, torch.Tensor] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Objective:
    """Build the catalogue objective `name` from its data and options (validated)."""
    cls = OBJECTIVES.get(name)
    if cls is None:
        raise UnknownNameError("objective", name, list(OBJECTIVES))
    return cls(data or {}, options or {})


__all__ = ["OBJECTIVES", "Objective", "make_objective"]
