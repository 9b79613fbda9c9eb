"""AnalyzeCurvature in plain Python: SpectrumOptions from keywords, the answer as numpy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import tensors
from .options import build, enum_label
from .proto import optimize_pb2, service_pb2
from .results import Conversion, Verdict, _label, _Result, wire_dataclass, wire_values


def spectrum_options(**values: Any) -> optimize_pb2.SpectrumOptions:
    """SpectrumOptions from keyword arguments; None leaves a field at the engine default."""
    return build(optimize_pb2.SpectrumOptions, "a spectrum option", "options", values)


@dataclass(frozen=True, eq=False)  # _Result's equality
class TraceResult(_Result):
    """A stochastic trace estimate: estimate +- half_width at `confidence`."""

    estimate: float
    half_width: float
    confidence: float
    products: int


@dataclass(frozen=True, eq=False)  # _Result's equality
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


# The fields the client converts; every other field is taken as it is on the wire.
_CONVERTED: dict[str, Conversion] = {
    "curvature": (str, lambda m: enum_label("curvature", m.curvature)),
    "trace_hutchinson": (TraceResult | None, lambda m: _trace(m, "trace_hutchinson")),
    "trace_hutchpp": (TraceResult | None, lambda m: _trace(m, "trace_hutchpp")),
    "density": (DensityResult | None, _density),
    "verdict": (
        Verdict | None,
        lambda m: _label(Verdict, optimize_pb2.Verdict, "VERDICT_", m.verdict),
    ),
}
CurvatureResult = wire_dataclass(
    "CurvatureResult",
    service_pb2.AnalyzeCurvatureResponse,
    "AnalyzeCurvature's answer: extremes, traces, density and verdict as Python values (one "
    "field per AnalyzeCurvatureResponse field, and the message as `raw`).",
    _CONVERTED,
    raw=True,
    module=__name__,
)


def from_wire(msg: service_pb2.AnalyzeCurvatureResponse) -> CurvatureResult:
    """The plain-Python CurvatureResult of a wire response."""
    return CurvatureResult(**wire_values(msg, _CONVERTED), raw=msg)
