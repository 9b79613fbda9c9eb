"""Method options and stopping criteria from plain Python values (engine names as strings)."""

from __future__ import annotations

from typing import Any

from .errors import invalid
from .proto import optimize_pb2

ENUMS = {
    "method": ("METHOD_", optimize_pb2.Method),
    "step_policy": ("STEP_POLICY_", optimize_pb2.StepPolicy),
    "curvature": ("CURVATURE_", optimize_pb2.Curvature),
    "backend": ("BACKEND_", optimize_pb2.Backend),
    "cg_forcing": ("CG_FORCING_", optimize_pb2.CgForcing),
    "hvp_mode": ("HVP_MODE_", optimize_pb2.HvpMode),
}
SCALARS = (
    "learning_rate",
    "damping",
    "eigenvalue_floor",
    "armijo",
    "backtrack",
    "max_backtracks",
    "dense_budget_bytes",
    "cg_max_iterations",
    "cg_tolerance",
    "trust_radius",
    "curvature_fraction",
    "seed",
    "gradient_fraction",
)
STOP_FIELDS = (
    "max_iterations",
    "gradient_tolerance",
    "function_tolerance",
    "parameter_tolerance",
    "time_limit_seconds",
)


def enum_value(field: str, name: str | None) -> int:
    """The wire value for an engine name such as "newton" (None: unspecified)."""
    prefix, enum_type = ENUMS[field]
    if name is None:
        return 0
    known = choices(field)
    if not isinstance(name, str) or name.lower() not in known:
        raise invalid(field, f"one of {known}", name)
    return enum_type.Value(prefix + name.upper())


def choices(field: str) -> list[str]:
    """The engine names an enum option accepts, from the proto descriptor."""
    prefix, enum_type = ENUMS[field]
    return [k.removeprefix(prefix).lower() for k in enum_type.keys()[1:]]


def enum_label(field: str, value: int) -> str:
    """The engine name of a wire enum value ("" when unspecified)."""
    prefix, enum_type = ENUMS[field]
    return "" if value == 0 else enum_type.Name(value).removeprefix(prefix).lower()


def method_options(**values: Any) -> optimize_pb2.MethodOptions:
    """MethodOptions from keyword arguments; None leaves a field at the server's default."""
    msg = optimize_pb2.MethodOptions()
    for key, value in values.items():
        if value is None:
            continue
        if key in ENUMS:
            setattr(msg, key, enum_value(key, value))
        elif key in SCALARS:
            setattr(msg, key, value)
        else:
            raise invalid("options", f"a method option, one of {[*ENUMS, *SCALARS]}", key)
    return msg


def stop_criteria(**values: Any) -> optimize_pb2.StopCriteria:
    """StopCriteria from keyword arguments; None leaves a criterion at the engine default."""
    msg = optimize_pb2.StopCriteria()
    for key, value in values.items():
        if value is None:
            continue
        if key not in STOP_FIELDS:
            raise invalid("stopping", f"a criterion, one of {list(STOP_FIELDS)}", key)
        setattr(msg, key, value)
    return msg
