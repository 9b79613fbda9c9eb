"""`least_squares`: scipy.optimize.least_squares' calling convention, the server as the solver.

The caller offers residuals r(x) (`fun`) and their Jacobian J (`jac`: an m x n array, or
an operator with `matvec` / `rmatvec` such as SciPy's LinearOperator); the server minimises
0.5 ||r||^2 with Gauss-Newton curvature, asking for the loss, the gradient J^T r and the
Gauss-Newton products J^T J v, which are formed here. No torch needed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from .client import _mapping
from .errors import invalid
from .minimize import (
    SCIPY_NAMES,
    SCIPY_OPTIONS,
    OptimizeResult,
    _numbers,
    _Session,
    drive,
    drive_async,
    is_sparse,
    refuse_unserved,
    unbounded,
)
from .proto import optimize_pb2, service_pb2
from .tensors import decode, encode

LM = {"method": "newton", "curvature": "gauss_newton", "step_policy": "levenberg_marquardt"}
# least_squares' method names -> the server's method options (curvature gauss_newton)
LSQ_METHODS: dict[str, dict[str, str]] = {
    "levenberg_marquardt": LM,
    "lm": LM,
    "gauss_newton": {"method": "newton", "curvature": "gauss_newton"},
    "gauss_newton_cg": {"method": "gauss_newton_cg"},
    "auto": {"method": "auto", "curvature": "gauss_newton"},
}
# SciPy's status per the server's stop reason (success is status > 0, as in SciPy)
STATUS = {
    "GRADIENT_TOLERANCE": 1,
    "FUNCTION_STALLED": 2,
    # no step lowers the cost at machine precision: SciPy's ftol condition (a relative
    # reduction below ftol), met at any ftol; its lm refuses tolerances that could not be
    "NO_PROGRESS": 2,
    "PARAMETERS_STALLED": 3,
    "MAX_ITERATIONS": 0,
}
KEEP_POINTS = 4  # residuals and Jacobians kept for the last points that asked a gradient


class _LeastSquaresSession(_Session):
    """One Optimize stream for residuals `fun` and Jacobian `jac`: answers loss, gradient
    and Gauss-Newton products; caches r and J per point so each is computed once there."""

    methods = LSQ_METHODS
    missing_derivative = "method"  # J^T J for levenberg_marquardt: n <= 64

    def __init__(
        self,
        fun: Callable[..., Any],
        jac: Callable[..., Any],
        caller_options: frozenset[str],
        **kwargs: Any,
    ) -> None:
        """`caller_options`: the keys the caller's `options` itself set (its criteria are
        named there, not as least_squares' own arguments)."""
        super().__init__(fun, jac=jac, hess=None, hessp=None, callback=None, **kwargs)
        self.caller_options = caller_options
        self.counts = {"nfev": 0, "njev": 0, "round_trips": 0}
        self.residuals: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.jacobians: OrderedDict[bytes, Any] = OrderedDict()
        self.m: int | None = None  # the residual count, fixed by the first evaluation

    def capabilities(self) -> service_pb2.Capabilities:
        return service_pb2.Capabilities(gradient=True, gauss_newton=True)

    def argument(self, field: str) -> str:
        """As minimize's, with least_squares' own arguments for its criteria (unless the
        caller set the criterion in `options`, where minimize's naming finds it)."""
        key = field.removeprefix("start.").removeprefix("stopping.")
        if key in self.caller_options or SCIPY_NAMES.get(key) in self.caller_options:
            return super().argument(field)
        return ARGUMENTS.get(key) or super().argument(field)

    def _residuals(self, x: np.ndarray) -> np.ndarray:
        key = x.tobytes()
        if key not in self.residuals:
            self.counts["nfev"] += 1
            got = self.fun(x.copy(), *self.args)  # its own copy, as SciPy gives it
            r = np.atleast_1d(_numbers(got, "fun", "residuals of shape (m,)"))
            if r.ndim != 1:
                raise invalid("fun", "residuals of shape (m,)", f"shape {r.shape}")
            if self.m is None:
                self.m = r.size
            elif r.size != self.m:  # as scipy: the residual count may not change
                raise invalid("fun", f"residuals of shape ({self.m},) at every point", r.shape)
            self.residuals[key] = r
            _trim(self.residuals)
        return self.residuals[key]

    def _jacobian(self, x: np.ndarray) -> Any:
        key = x.tobytes()
        if key not in self.jacobians:
            self.counts["njev"] += 1
            jac = self.jac(x.copy(), *self.args)
            m = self._residuals(x).size
            if not (hasattr(jac, "rmatvec") or is_sparse(jac)):  # sparse: J @ v, J.T @ u
                jac = np.atleast_2d(_numbers(jac, "jac", f"an array of shape ({m}, {x.size})"))
                if jac.shape != (m, x.size):
                    raise invalid("jac", f"an array of shape ({m}, {x.size})", jac.shape)
            elif tuple(getattr(jac, "shape", (m, x.size))) != (m, x.size):
                raise invalid("jac", f"an operator of shape ({m}, {x.size})", jac.shape)
            self.jacobians[key] = jac
            _trim(self.jacobians)
        return self.jacobians[key]

    def evaluate(self, ask: Any) -> service_pb2.OptimizeRequest:
        """The Evaluation answering `ask`: 0.5 ||r||^2, J^T r, J^T (J v) at the point."""
        self.counts["round_trips"] += 1
        x = decode(ask.point).astype(np.float64)
        out = service_pb2.Evaluation(request_id=ask.request_id)
        if ask.loss or ask.gradient:
            r = self._residuals(x)
            out.loss = 0.5 * float(r @ r)
            if ask.loss and not math.isfinite(out.loss):  # nothing else is read there
                return service_pb2.OptimizeRequest(evaluation=out)
        if ask.gradient:
            out.gradient.CopyFrom(encode(_rmatvec(self._jacobian(x), self._residuals(x))))
        if ask.HasField("gn_vectors"):
            jac = self._jacobian(x)
            products = [_rmatvec(jac, _matvec(jac, v)) for v in decode(ask.gn_vectors)]
            out.gn_products.CopyFrom(encode(np.stack(products)))
        return service_pb2.OptimizeRequest(evaluation=out)

    def result(self) -> OptimizeResult:
        info = self.finished
        x = decode(info.final_params).astype(np.float64).reshape(-1)
        r = self._residuals(x)
        jac = grad = None  # not asked where the residuals are not finite (a failed start)
        if np.all(np.isfinite(r)):
            jac = self._jacobian(x)  # cached: x asked its gradient
            grad = _rmatvec(jac, r)
        reason = optimize_pb2.StopReason.Name(info.stop_reason).removeprefix("STOP_REASON_")
        status = STATUS.get(reason, -1)
        result = OptimizeResult(
            x=x,
            cost=0.5 * float(r @ r),
            fun=r,
            jac=jac,
            grad=grad,
            optimality=math.nan if grad is None else float(np.max(np.abs(grad), initial=0.0)),
            active_mask=np.zeros(x.size, dtype=int),
            nit=info.last_record.iteration,
            status=status,
            success=status > 0,
            message=info.message or reason,
            run_id=info.run_id,
            run_status=service_pb2.RunStatus.Name(info.status).removeprefix("RUN_STATUS_"),
            **self.counts,
        )
        if self.disp:  # options={"disp": True}: SciPy's verbose=1 report
            print(
                f"{result.message}\nFunction evaluations {result.nfev}, final cost "
                f"{result.cost:.4e}, first-order optimality {result.optimality:.2e}."
            )
        return result


def _trim(cache: OrderedDict[bytes, Any]) -> None:
    while len(cache) > KEEP_POINTS:
        cache.popitem(last=False)


def _matvec(jac: Any, v: np.ndarray) -> np.ndarray:
    return np.asarray(jac.matvec(v) if hasattr(jac, "matvec") else jac @ v, dtype=np.float64)


def _rmatvec(jac: Any, u: np.ndarray) -> np.ndarray:
    out = jac.rmatvec(u) if hasattr(jac, "rmatvec") else jac.T @ u
    return np.asarray(out, dtype=np.float64).reshape(-1)


def _session(
    fun: Any, x0: Any, jac: Any, method: str | None, loss: str, bounds: Any,
    stopping: dict[str, Any], args: tuple, options: dict[str, Any] | None, name: str,
) -> _LeastSquaresSession:  # fmt: skip
    """The session of one least_squares call; bad arguments named before any call."""
    if not callable(jac):
        raise invalid(
            "jac",
            "a callable returning the m x n Jacobian, or an operator (finite differences are "
            "not served)",
            jac,
        )
    if loss != "linear":
        raise invalid("loss", "'linear' (robust losses are not served)", loss)
    if not unbounded(bounds):
        raise invalid("bounds", "none, or SciPy's default (-inf, inf): bounds are not served",
                      bounds)  # fmt: skip
    given = {k: v for k, v in stopping.items() if v is not None}
    options = _mapping("options", options)
    for key, value in options.items():  # one setting, two values: which one?
        if SCIPY_OPTIONS.get(key, key) in given:
            raise invalid(f"options.{key}", "no second value: an argument sets it", value)
    if isinstance(args, list):  # SciPy's least_squares unpacks any sequence (minimize wraps)
        args = tuple(args)
    return _LeastSquaresSession(
        fun, jac, frozenset(options), x0=x0, args=args,
        method=method or "levenberg_marquardt", tol=None, options={**given, **options},
        name=name,
    )  # fmt: skip


LSQ_ARGUMENTS = ("fun, x0, jac, method, ftol, xtol, gtol, loss, bounds, max_iterations, args, "
                 "options, address, token, name, resume")  # fmt: skip
# a stopping criterion -> the argument of least_squares that sets it
ARGUMENTS = {"function_tolerance": "ftol", "parameter_tolerance": "xtol",
             "gradient_tolerance": "gtol", "max_iterations": "max_iterations"}  # fmt: skip


def _stopping(ftol: float | None, xtol: float | None, gtol: float | None,
              max_iterations: int | None) -> dict[str, Any]:  # fmt: skip
    """SciPy's tolerance names -> the server's stopping criteria (None: its default)."""
    given = {"ftol": ftol, "xtol": xtol, "gtol": gtol, "max_iterations": max_iterations}
    return {ours: given[argument] for ours, argument in ARGUMENTS.items()}


def least_squares(
    fun: Callable[..., Any],
    x0: Any,
    jac: Callable[..., Any] | None = None,
    *,
    method: str | None = None,
    ftol: float | None = None,
    xtol: float | None = None,
    gtol: float | None = None,
    loss: str = "linear",
    bounds: Any = None,
    max_iterations: int | None = None,
    args: tuple = (),
    options: dict[str, Any] | None = None,
    address: str | None = None,
    token: str | None = None,
    name: str = "",
    resume: str | None = None,
    **unserved: Any,
) -> OptimizeResult:
    """Minimise 0.5 ||fun(x)||^2 from `x0` on the server, SciPy least_squares-style.

    `jac(x)` is the m x n Jacobian (an array, or an operator with matvec / rmatvec; no
    finite differences). method: levenberg_marquardt (= "lm", the default; dense J^T J,
    n <= 64), gauss_newton (line search), gauss_newton_cg (trust-region CG on J^T J v, any
    n), auto. ftol / xtol / gtol: the server's function / parameter / gradient (max|J^T r|)
    tolerances, unset: its defaults. `options`: more stopping criteria and method options.
    `loss` other than "linear" and `bounds` other than None or SciPy's (-inf, inf) are
    refused (not served). `resume`: an INTERRUPTED least_squares run's id, as minimize's.
    Returns SciPy's fields (x, cost, fun, jac, grad, optimality, active_mask, nfev, njev,
    status, message, success) and nit, run_id, run_status, round_trips.
    """
    refuse_unserved(unserved, LSQ_ARGUMENTS)
    stopping = _stopping(ftol, xtol, gtol, max_iterations)
    session = _session(fun, x0, jac, method, loss, bounds, stopping, args, options, name)
    return drive(session, resume, address, token)


async def least_squares_async(
    fun: Callable[..., Any],
    x0: Any,
    jac: Callable[..., Any] | None = None,
    *,
    method: str | None = None,
    ftol: float | None = None,
    xtol: float | None = None,
    gtol: float | None = None,
    loss: str = "linear",
    bounds: Any = None,
    max_iterations: int | None = None,
    args: tuple = (),
    options: dict[str, Any] | None = None,
    address: str | None = None,
    token: str | None = None,
    name: str = "",
    resume: str | None = None,
    **unserved: Any,
) -> OptimizeResult:
    """`least_squares` on grpc.aio, as minimize_async: plain functions run on the event
    loop, `async def` ones are awaited on it."""
    refuse_unserved(unserved, LSQ_ARGUMENTS)
    stopping = _stopping(ftol, xtol, gtol, max_iterations)
    session = _session(fun, x0, jac, method, loss, bounds, stopping, args, options, name)
    return await drive_async(session, resume, address, token)
