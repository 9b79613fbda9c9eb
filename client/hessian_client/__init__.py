"""Thin client SDK for the hessian service: numpy in, numpy out; torch accepted, never needed."""

from . import problems
from .client import Client, HessianResult, Run, RunResult, StepResult, status_name
from .curvature import CurvatureResult, DensityResult, TraceResult
from .errors import (
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    HessianError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"
__all__ = [
    "Cancelled",
    "Client",
    "CurvatureResult",
    "DataLoss",
    "DeadlineExceeded",
    "DensityResult",
    "FailedPrecondition",
    "HessianError",
    "HessianResult",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Run",
    "RunResult",
    "StepResult",
    "TraceResult",
    "Unauthenticated",
    "Unavailable",
    "problems",
    "status_name",
]
