"""The optimisation engine: objectives, curvature, methods and runs. Importable without grpc."""

from .analysis.spectrum import CurvatureReport, SpectrumOptions, analyze_curvature
from .backends.selector import native_status
from .budget import check_dense_budget
from .cancel import Cancelled
from .curvature.autograd import gauss_newton, hessian, hvp, loss_and_grad
from .errors import (
    EngineError,
    ResourceLimitError,
    UnavailableError,
    UnknownNameError,
    ValidationError,
)
from .objectives import OBJECTIVES, Objective, make_objective
from .options import MethodOptions, StopCriteria, resolve_method
from .records import Checkpoint, StepRecord, StepResult, StopReason
from .solvers.run import CancelToken, Run, take_step

__all__ = [
    "OBJECTIVES",
    "CancelToken",
    "Cancelled",
    "Checkpoint",
    "CurvatureReport",
    "EngineError",
    "MethodOptions",
    "Objective",
    "ResourceLimitError",
    "Run",
    "SpectrumOptions",
    "StepRecord",
    "StepResult",
    "StopCriteria",
    "StopReason",
    "UnavailableError",
    "UnknownNameError",
    "ValidationError",
    "analyze_curvature",
    "check_dense_budget",
    "gauss_newton",
    "hessian",
    "hvp",
    "loss_and_grad",
    "make_objective",
    "native_status",
    "resolve_method",
    "take_step",
]
