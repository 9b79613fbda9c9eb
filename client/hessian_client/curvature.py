"""AnalyzeCurvature in plain Python: SpectrumOptions from keywords, the answer as numpy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import tensors
from .options import build, enum_label
from .proto import optimize_pb2, service_pb2
from .results import Verdict, _jsonable, _label


def spectrum_options(**values: Any) -> optimize_pb2.SpectrumOptions:
    """SpectrumOptions from keyword arguments; None leaves a field at the engine default."""
    return build(optimize_pb2.SpectrumOptions, "a spectrum option", "options", values)


@dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate: estimate +- half_width at `confidence`."""

    estimate: float
    half_width: float
    confidence: float
    products: int


@dataclass(frozen=True)
class DensityResult:
    """The SLQ spectral density: `values` on `grid` (integrates to 1), and SLQ's trace."""

    grid: np.ndarray
    values: np.ndarray
    sigma: float
    probes: int
    steps: int
    trace: float


@dataclass(frozen=True)
class CurvatureResult:
    """AnalyzeCurvature's answer: extremes, traces, density and verdict as Python values."""

    num_params: int
    curvature: str
    loss: float
    gradient_max_norm: float
    stationary: bool
    top_eigenvalues: list[float]
    bottom_eigenvalues: list[float]
    eigen_residuals: list[float]
    lanczos_iterations: int
    eigenvalues_converged: bool
    trace_hutchinson: TraceResult | None
    trace_hutchpp: TraceResult | None
    density: DensityResult | None
    products: int
    products_by_part: dict[str, int]
    verdict: Verdict | None  # type: ignore[valid-type]
    verdict_reason: str
    seconds: float
    backend: str = ""
    raw: service_pb2.AnalyzeCurvatureResponse | None = field(
        default=None, repr=False, compare=False
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (arrays as lists, verdict by name), the raw protobuf left out."""
        return {k: _jsonable(v) for k, v in asdict(self).items() if k != "raw"}


def _trace(msg: service_pb2.AnalyzeCurvatureResponse, name: str) -> TraceResult | None:
    if not msg.HasField(name):
        return None
    t = getattr(msg, name)
    return TraceResult(t.estimate, t.half_width, t.confidence, int(t.products))


def from_wire(msg: service_pb2.AnalyzeCurvatureResponse) -> CurvatureResult:
    """The plain-Python CurvatureResult of a wire response."""
    density = None
    if msg.HasField("density"):
        d = msg.density
        density = DensityResult(
            tensors.decode(d.grid), tensors.decode(d.density), d.sigma, d.probes, d.steps, d.trace
        )
    verdict = _label(Verdict, optimize_pb2.Verdict, "VERDICT_", msg.verdict)
    return CurvatureResult(
        num_params=int(msg.num_params),
        curvature=enum_label("curvature", msg.curvature),
        loss=msg.loss,
        gradient_max_norm=msg.gradient_max_norm,
        stationary=msg.stationary,
        top_eigenvalues=list(msg.top_eigenvalues),
        bottom_eigenvalues=list(msg.bottom_eigenvalues),
        eigen_residuals=list(msg.eigen_residuals),
        lanczos_iterations=int(msg.lanczos_iterations),
        eigenvalues_converged=msg.eigenvalues_converged,
        trace_hutchinson=_trace(msg, "trace_hutchinson"),
        trace_hutchpp=_trace(msg, "trace_hutchpp"),
        density=density,
        products=int(msg.products),
        products_by_part=dict(msg.products_by_part),
        verdict=verdict,
        verdict_reason=msg.verdict_reason,
        seconds=msg.seconds,
        backend=msg.backend,
        raw=msg,
    )
