"""Builders for catalogue problems: each returns a `Problem` message ready to send."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .proto import problem_pb2
from .tensors import encode

Problem = problem_pb2.Problem


def _data(**tensors: Any) -> dict[str, Any]:
    return {name: encode(value) for name, value in tensors.items() if value is not None}


def mse(target: Any) -> Problem:
    """mean((params - target)^2); parameters are shaped like `target`."""
    return Problem(mse=problem_pb2.MseObjective(), data=_data(target=target))


def least_squares(X: Any, y: Any, *, l2: float = 0.0, fit_intercept: bool = False) -> Problem:
    """0.5 mean((X w + b - y)^2) + 0.5 l2 ||w||^2."""
    objective = problem_pb2.LeastSquaresObjective(l2=l2, fit_intercept=fit_intercept)
    return Problem(least_squares=objective, data=_data(X=X, y=y))


def logistic_regression(X: Any, y: Any, *, l2: float = 0.0, fit_intercept: bool = True) -> Problem:
    """Mean logistic loss of X w + b against y in {0, 1}, plus 0.5 l2 ||w||^2."""
    objective = problem_pb2.LogisticRegressionObjective(l2=l2, fit_intercept=fit_intercept)
    return Problem(logistic_regression=objective, data=_data(X=X, y=y))


def softmax_regression(
    X: Any,
    labels: Any,
    *,
    num_classes: int = 0,
    l2: float = 0.0,
    fit_intercept: bool = True,
) -> Problem:
    """Multinomial cross-entropy; labels are integers in [0, num_classes)."""
    objective = problem_pb2.SoftmaxRegressionObjective(
        num_classes=num_classes, l2=l2, fit_intercept=fit_intercept
    )
    return Problem(softmax_regression=objective, data=_data(X=X, labels=labels))


def mlp(
    X: Any,
    y: Any,
    *,
    layer_sizes: Sequence[int],
    activation: str = "",
    loss: str = "",
    l2: float = 0.0,
) -> Problem:
    """A fully connected network with an mse or cross_entropy loss."""
    objective = problem_pb2.MlpObjective(
        layer_sizes=list(layer_sizes), activation=activation, loss=loss, l2=l2
    )
    return Problem(mlp=objective, data=_data(X=X, y=y))


def rosenbrock(dim: int = 2) -> Problem:
    """The Rosenbrock function in `dim` dimensions."""
    return Problem(rosenbrock=problem_pb2.RosenbrockObjective(dim=dim))


def quadratic(A: Any, b: Any) -> Problem:
    """0.5 x^T A x - b^T x with A symmetric."""
    return Problem(quadratic=problem_pb2.QuadraticObjective(), data=_data(A=A, b=b))
