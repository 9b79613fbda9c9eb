"""AnalyzeCurvature in plain Python: SpectrumOptions from keywords, the answer as numpy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from . import tensors
from .options import build, enum_label
from .proto import optimize_pb2, service_pb2
from .results import Verdict, _label, _Result


def spectrum_options(**values: Any) -> optimize_pb2.SpectrumOptions:
    """SpectrumOptions from keyword arguments; None leaves a field at the engine default."""
    return build(optimize_pb2.SpectrumOptions, "a spectrum option", "options", values)


@dataclass(frozen=True)
class TraceResult(_Result):
    """A stochastic trace estimate: estimate +- half_width at `confidence`."""

    estimate: float
    half_width: float
    confidence: float
    products: int


@dataclass(frozen=True)
class DensityResult(_Result):
    """The SLQ spectral density: `values` on `grid` (integrates to 1), and SLQ's trace."""

    grid: np.ndarray
    values: np.ndarray
    sigma: float
    probes: int
    steps: int
    trace: float


def _trace(msg: service_pb2.AnalyzeCurvatureResponse, name: str) -> TraceResult | None:
    if not msg.HasField(name):
        return None
    t = getattr(msg, name)
    return TraceResult(t.estimate, t.half_width, t.confidence, int(t.products))


def _density(msg: service_pb2.AnalyzeCurvatureResponse) -> DensityResult | None:
    if not msg.HasField("density"):
        return None
    d = msg.density
    return DensityResult(
        tensors.decode(d.grid), tensors.decode(d.density), d.sigma, d.probes, d.steps, d.trace
    )


# The fields the client converts (type, conversion); every other field of the response is
# taken as it is on the wire (repeated as a list, map as a dict).
_CONVERTED: dict[str, tuple[Any, Callable[[service_pb2.AnalyzeCurvatureResponse], Any]]] = {
    "curvature": (str, lambda m: enum_label("curvature", m.curvature)),
    "trace_hutchinson": (TraceResult | None, lambda m: _trace(m, "trace_hutchinson")),
    "trace_hutchpp": (TraceResult | None, lambda m: _trace(m, "trace_hutchpp")),
    "density": (DensityResult | None, _density),
    "verdict": (
        Verdict | None,
        lambda m: _label(Verdict, optimize_pb2.Verdict, "VERDICT_", m.verdict),
    ),
}
_SCALARS = {
    FieldDescriptor.CPPTYPE_DOUBLE: float,
    FieldDescriptor.CPPTYPE_INT64: int,
    FieldDescriptor.CPPTYPE_BOOL: bool,
    FieldDescriptor.CPPTYPE_STRING: str,
}
_RESPONSE = service_pb2.AnalyzeCurvatureResponse.DESCRIPTOR


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _field_type(fd: FieldDescriptor) -> Any:
    """The Python type of a response field as CurvatureResult holds it."""
    if fd.name in _CONVERTED:
        return _CONVERTED[fd.name][0]
    if _is_map(fd):
        key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        return dict[_SCALARS[key.cpp_type], _SCALARS[value.cpp_type]]  # type: ignore[misc]
    if fd.is_repeated:
        return list[_SCALARS[fd.cpp_type]]  # type: ignore[misc]
    return _SCALARS[fd.cpp_type]


def _value(msg: service_pb2.AnalyzeCurvatureResponse, fd: FieldDescriptor) -> Any:
    if fd.name in _CONVERTED:
        return _CONVERTED[fd.name][1](msg)
    value = getattr(msg, fd.name)
    if _is_map(fd):
        return dict(value)
    return list(value) if fd.is_repeated else value


# AnalyzeCurvature's answer as Python values: one field per AnalyzeCurvatureResponse field
# (read from its descriptor, so a field added to the proto appears here with no edit), and
# the protobuf itself as `raw`.
CurvatureResult = make_dataclass(
    "CurvatureResult",
    [(fd.name, _field_type(fd)) for fd in _RESPONSE.fields]
    + [
        (
            "raw",
            service_pb2.AnalyzeCurvatureResponse | None,
            field(default=None, repr=False, compare=False),
        )
    ],
    bases=(_Result,),
    frozen=True,
)
CurvatureResult.__module__ = __name__
CurvatureResult.__doc__ = (
    "AnalyzeCurvature's answer: extremes, traces, density and verdict as Python values."
)


def from_wire(msg: service_pb2.AnalyzeCurvatureResponse) -> CurvatureResult:
    """The plain-Python CurvatureResult of a wire response."""
    return CurvatureResult(**{fd.name: _value(msg, fd) for fd in _RESPONSE.fields}, raw=msg)
