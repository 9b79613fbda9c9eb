"""`minimize`: scipy.optimize.minimize's calling convention, the server as the optimiser.

The caller's functions run here (numpy in, numpy out); the server runs the method over one
Optimize stream, asking for values at the points it needs. Every accepted step is a
record of a normal run that other clients can watch. No torch needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import queue
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from .aio import Client as AsyncClient
from .awaiting import LoopBridge, is_async
from .client import Client, _mapping, _text, call_error, check_fits
from .errors import DeadlineExceeded, HessianError, Unavailable, invalid
from .options import STOP_FIELDS, method_options, stop_criteria
from .proto import optimize_pb2, service_pb2
from .tensors import decode, encode

# minimize's method names -> the server's method options
METHODS: dict[str, dict[str, str]] = {
    "auto": {"method": "auto"},
    "newton": {"method": "newton"},
    "levenberg_marquardt": {"method": "newton", "step_policy": "levenberg_marquardt"},
    "saddle_free": {"method": "saddle_free"},
    "gradient_descent": {"method": "gradient_descent"},
    "newton_cg": {"method": "newton_cg"},
}
# SciPy's option names -> the server's stopping criteria
SCIPY_OPTIONS = {"maxiter": "max_iterations", "gtol": "gradient_tolerance"}
SCIPY_NAMES = {ours: scipy for scipy, ours in SCIPY_OPTIONS.items()}
DEFAULT_MAXITER = 1000
# how a stream breaks under a run (server gone, connection cut, a deadline): it resumes
RESUMABLE_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)
CALLBACK_STOP_STATUS = 99  # SciPy's status when a callback raised StopIteration
# SciPy's second-order method names -> the nearest method here (named in a refusal only: the
# globalisation differs, so they are not taken as aliases)
SCIPY_METHODS = {"newton-cg": "newton_cg", "trust-ncg": "newton_cg", "trust-krylov": "newton_cg",
                 "trust-exact": "newton", "dogleg": "newton", "trf": "gauss_newton_cg"}  # fmt: skip
CALLER_FUNCTIONS = ("fun", "jac", "hess", "hessp", "callback")  # a session's, as attributes
ASYNC_NOTE = "(async def functions are awaited by minimize_async and least_squares_async)"


class OptimizeResult(dict):
    """SciPy's OptimizeResult: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    __setattr__ = dict.__setitem__  # type: ignore[assignment]


def is_sparse(value: Any) -> bool:
    """Whether `value` is a scipy.sparse matrix or array (told by its interface: the SDK
    does not need SciPy)."""
    return hasattr(value, "toarray") and hasattr(value, "nnz")


def _numbers(value: Any, name: str, expected: str) -> np.ndarray:
    """`value` (a scipy.sparse one made dense) as a float64 array; anything that is not
    numbers is refused naming `name`."""
    if value is None:  # numpy would take it as NaN
        raise invalid(name, expected, None)
    if inspect.isawaitable(value):  # an async function called where nothing awaits it
        with contextlib.suppress(AttributeError):
            value.close()  # never awaited: closed, so Python does not warn about it
        raise invalid(name, f"{expected}, not an awaitable {ASYNC_NOTE}", type(value).__name__)
    if is_sparse(value):
        value = value.toarray()
    elif hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, even one
        value = value.detach().cpu()  # that requires grad (the SDK does not import torch)
    try:
        raw = np.asarray(value)
        if raw.dtype.kind not in "biuf":  # complex (its imaginary part), strings, objects
            raise TypeError
        return raw.astype(np.float64)
    except (TypeError, ValueError):
        raise invalid(name, expected, type(value).__name__) from None


def _scalar(value: Any, name: str, expected: str = "a number (or an array of one)") -> float:
    """The loss `value` as a float: a number or a size-1 array, as SciPy takes it."""
    out = _numbers(value, name, expected)
    if out.size != 1:
        raise invalid(name, expected, out.shape)
    return float(out.reshape(()))


def _shaped(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """`value` as float64 of `shape`, a scalar taken as one value (as SciPy takes a scalar
    jac or hess of a one-parameter problem; a scipy.sparse one made dense); any other shape,
    or anything that is not numbers, is refused naming `name`."""
    out = _numbers(value, name, f"an array of numbers of shape {shape}")
    if out.ndim == 0 or (out.ndim == 1 and len(shape) == 2):
        out = out.reshape((1,) * len(shape)) if out.size == 1 else out
    if out.shape != shape:
        raise invalid(name, f"an array of shape {shape}", out.shape)
    return out


def _method_name(method: Any, methods: dict[str, Any]) -> str:
    """`method` as a key of `methods` (any case); refused naming the nearest for SciPy's."""
    name = method.lower() if isinstance(method, str) else method
    if name in methods:
        return name
    expected = f"one of {list(methods)}"
    nearest = SCIPY_METHODS.get(name) if isinstance(name, str) else None
    if nearest in methods:
        expected += f" (SciPy's {method!r} is nearest to {nearest!r} here)"
    raise invalid("method", expected, method)


def unbounded(bounds: Any) -> bool:
    """None, or SciPy's default (-inf, inf) (a scipy.optimize.Bounds too): no bound at all."""
    if bounds is None:
        return True
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):  # scipy.optimize.Bounds
        bounds = (bounds.lb, bounds.ub)
    try:
        low, high = (np.asarray(b, dtype=np.float64) for b in bounds)
    except (TypeError, ValueError):
        return False
    return bool(np.all(low == -np.inf) and np.all(high == np.inf))


def _unbounded_pairs(bounds: Any) -> bool:
    """minimize's form of no bound: a (min, max) pair per variable, each None or infinite."""
    try:
        pairs = [(-np.inf if low is None else low, np.inf if high is None else high)
                 for low, high in bounds]  # fmt: skip
        low, high = np.asarray(pairs, dtype=np.float64).reshape(-1, 2).T
    except (TypeError, ValueError):
        return False
    return bool(np.all(low == -np.inf) and np.all(high == np.inf))


# keys that go in `options` (SciPy's names, the criteria, the method options, speculative)
OPTION_KEYS = frozenset(
    {*SCIPY_OPTIONS, *STOP_FIELDS, *optimize_pb2.MethodOptions.DESCRIPTOR.fields_by_name,
     "speculative", "disp"}
)  # fmt: skip


def refuse_unserved(
    unserved: dict[str, Any], served: str, options: frozenset[str] = frozenset()
) -> None:
    """Refuse SciPy arguments this SDK does not serve by name, as an InvalidArgument (not
    Python's TypeError); `served` lists the ones it does. A key of `options` given as an
    argument (`speculative=False`) is told where it goes."""
    for key, value in unserved.items():
        if key in options:
            raise invalid(key, f"it inside options (options={{{key!r}: ...}})", value)
        raise invalid(key, f"an argument this function serves ({served})", value)


def _unconstrained(bounds: Any, constraints: Any) -> None:
    """Refuse, naming it, a bound or constraint minimize would otherwise ignore."""
    scipy_bounds = bounds is None or hasattr(bounds, "lb")  # None, or scipy's Bounds
    if not (unbounded(bounds) if scipy_bounds else _unbounded_pairs(bounds)):
        raise invalid("bounds", "none, or (None, None) / (-inf, inf) per variable: bounds are "
                      "not served", bounds)  # fmt: skip
    given = constraints is not None and (
        isinstance(constraints, dict) or not hasattr(constraints, "__len__") or len(constraints)
    )  # a dict, one LinearConstraint / NonlinearConstraint, or a non-empty sequence of them
    if given:
        raise invalid("constraints", "none: constraints are not served", constraints)


MINIMIZE_ARGUMENTS = ("fun, x0, args, method, jac, hess, hessp, bounds (none), constraints "
                      "(none), tol, callback, options, address, token, name, resume")  # fmt: skip


# a capability the server asks of the caller -> the argument that gives it (Gauss-Newton
# products, which minimize cannot give: the option that asked for them)
CAPABILITY_ARGUMENTS = {"gradient": "jac", "hessian": "hess", "hvp": "hessp",
                        "gauss_newton": "options.curvature"}  # fmt: skip
# the wire's fields of the opening request -> the argument of minimize that sets them
WIRE_ARGUMENTS = {"initial_params": "x0", "name": "name", "resume_run_id": "resume",
                  "resume_capabilities": "resume"}  # fmt: skip


class _Session:
    """The caller's side of one Optimize stream: evaluate what is asked, build the result."""

    methods = METHODS  # the method names this entry takes -> the server's method options
    missing_derivative = "hess"  # what a refusal of the caller's capabilities asks for

    def __init__(
        self,
        fun: Callable[..., Any],
        x0: Any,
        args: tuple,
        jac: Any,
        hess: Any,
        hessp: Any,
        method: str | None,
        tol: float | None,
        callback: Callable[[OptimizeResult], Any] | None,
        options: dict[str, Any] | None,
        name: str,
    ) -> None:
        if not isinstance(args, tuple):  # SciPy wraps one extra argument in a tuple
            args = (args,)
        self.fun, self.args, self.jac, self.hess, self.hessp = fun, args, jac, hess, hessp
        _check_derivatives(jac, hess, hessp)
        x = _numbers(x0, "x0", "a scalar or a 1-D array of numbers")
        if x.ndim > 1:  # SciPy refuses it too: fun would see x flattened, res.x flat
            raise invalid("x0", "a scalar or a 1-D array of parameters", x.shape)
        self.x0 = x.reshape(-1)
        if self.x0.size == 0:
            raise invalid("x0", "an array of at least one parameter", np.shape(x0))
        self.method = _method_name(method or "auto", self.methods)
        if callback is not None and not callable(callback):
            raise invalid("callback", "a function of the intermediate result, or None", callback)
        self.callback = callback
        self.tol, self.name = tol, _text("name", name)
        self.options = dict(_mapping("options", options))
        speculative = self.options.get("speculative")
        if speculative is not None and not isinstance(speculative, (bool, np.bool_)):
            raise invalid("options.speculative", "True or False", speculative)
        self.disp = bool(self.options.pop("disp", False))  # SciPy's: print a short report
        for key, value in self.methods[self.method].items():
            if key in self.options:  # the method name sets it: two values for one option
                raise invalid(
                    f"options.{key}",
                    f"no {key} (method {self.method!r} sets {key}={value!r})",
                    self.options[key],
                )
        for scipy_name, ours in SCIPY_OPTIONS.items():
            if scipy_name in self.options and ours in self.options:  # which one would win?
                raise invalid(
                    f"options.{scipy_name}",
                    f"no {scipy_name} beside {ours} (two names, two values, one setting)",
                    self.options[scipy_name],
                )
        if not np.all(np.isfinite(self.x0)):
            raise invalid("x0", "finite numbers", "NaN or inf")
        self.counts = {"nfev": 0, "njev": 0, "nhev": 0, "round_trips": 0}
        self.seen: dict[bytes, dict[str, Any]] = {}  # values at each point asked (by bytes)
        # the iterate of the next record, and the latest point asked for its gradient: the
        # server evaluates each new iterate in full (gradient included) just before the
        # record of the step that reached it, so that point is the next iterate
        self.iterate: np.ndarray | None = None
        self.last_full: np.ndarray | None = None
        self.stop_asked = False
        self.stopped_at: OptimizeResult | None = None  # what the stopping callback saw
        self.run_id = ""
        self.finished: Any = None
        self.sent = service_pb2.OptimizeRequest()  # the stream's opening request, once made

    def coroutine_functions(self) -> list[str]:
        """The names of the caller's functions written `async def`."""
        return [name for name in CALLER_FUNCTIONS if is_async(getattr(self, name, None))]

    def refuse_coroutines(self) -> None:
        """Refuse, naming it, an async def function where nothing would await it."""
        for name in self.coroutine_functions():
            raise invalid(name, f"a plain function {ASYNC_NOTE}", getattr(self, name))

    def bridge(self, loop: asyncio.AbstractEventLoop) -> LoopBridge | None:
        """With async def functions: make each a plain one that runs it on `loop` and waits,
        for a session answering on a thread of its own (the bridge's); None without any."""
        names = self.coroutine_functions()
        if not names:
            return None
        bridge = LoopBridge(loop)
        for name in names:
            wait = bridge.callback if name == "callback" else bridge.call
            setattr(self, name, functools.partial(wait, getattr(self, name)))
        return bridge

    def answer(self, response: Any) -> service_pb2.OptimizeRequest | None:
        """`on_response`, with a StopIteration from the caller's functions made an error (a
        callback's is caught before: it stops the run): raised into the generator or
        coroutine driving the stream it would end it silently."""
        try:
            return self.on_response(response)
        except StopIteration as exc:
            raise RuntimeError("the caller's function raised StopIteration") from exc

    def start_request(self) -> service_pb2.OptimizeRequest:
        opts = dict(self.options)
        speculative = opts.pop("speculative", None)  # None: the server's default (True)
        stopping = {SCIPY_OPTIONS.get(k, k): opts.pop(k) for k in list(opts)
                    if SCIPY_OPTIONS.get(k, k) in STOP_FIELDS}  # fmt: skip
        stopping.setdefault("max_iterations", DEFAULT_MAXITER)
        if self.tol is not None:
            stopping.setdefault("gradient_tolerance", self.tol)
        try:
            criteria = stop_criteria(**stopping)
        except HessianError as exc:
            raise self.renamed(exc) from None
        start = service_pb2.OptimizeStart(
            initial_params=encode(self.x0),
            options=method_options(**self.methods[self.method], **opts),
            stopping=criteria,
            capabilities=self.capabilities(),
            name=self.name,
            speculative=None if speculative is None else bool(speculative),
        )
        return service_pb2.OptimizeRequest(start=start)

    def argument(self, field: str) -> str:
        """The argument of this call a refusal's `field` (the wire's, or stop_criteria's)
        stands for: x0, tol, options.maxiter, name, resume, hess... as the caller wrote them."""
        name = field.removeprefix("start.")
        if name in WIRE_ARGUMENTS:
            return WIRE_ARGUMENTS[name]
        if name.startswith("initial_params."):  # its shape, dtype...: the starting point's
            return "x0"
        if name == "options":  # the method as a whole (a dense matrix over its budget)
            return "method"
        if name == "capabilities":  # the derivatives the method needs, and the caller lacks
            return self.missing_derivative
        if name.startswith("capabilities."):  # one derivative, missing or too large to send
            return CAPABILITY_ARGUMENTS.get(name.removeprefix("capabilities."), field)
        if name.startswith("options."):  # method options, or the method name's own ones
            option = name.removeprefix("options.")
            return "method" if option in self.methods[self.method] else name
        key = name.removeprefix("stopping.")
        if key == name or key not in STOP_FIELDS:
            return field
        if key in self.options:  # written with the server's name
            return f"options.{key}"
        scipy = SCIPY_NAMES.get(key)
        if key == "gradient_tolerance" and self.tol is not None and scipy not in self.options:
            return "tol"
        return f"options.{scipy or key}"

    def renamed(self, error: HessianError) -> HessianError:
        """`error` naming the caller's argument instead of the wire's field; a default of
        this SDK's the server refuses (maxiter over its --max-iterations) says so."""
        field = self.argument(error.field) if error.field else ""
        if not field or field == error.field:
            return error
        message = error.message.replace(error.field, field, 1)
        wire_method = self.methods[self.method].get("method", self.method)
        if error.field.endswith("capabilities") and wire_method != self.method:
            # the method the caller named (least_squares' default levenberg_marquardt is the
            # server's newton): "for method newton" named one it never asked for
            message = message.replace(f"for method {wire_method}", f"for method {self.method}")
        if error.field.endswith("max_iterations") and not any(
            k in self.options for k in ("max_iterations", "maxiter")
        ):
            message += (
                f" (the default of {DEFAULT_MAXITER} iterations: pass {field} within the "
                "server's limit)"
            )
        renamed = type(error)(message, error.code, field=field, expected=error.expected)
        renamed.from_server = error.from_server
        for note in getattr(error, "__notes__", ()):
            renamed.add_note(note)
        return renamed

    def first_request(self, resume: str | None) -> service_pb2.OptimizeRequest:
        """The stream's opening request: resume run `resume` (it keeps the method, options
        and stopping criteria it was started with; the server refuses a caller that lacks
        the derivatives it was started with), or start a new run."""
        if not _text("resume", resume, ""):
            self.sent = self.start_request()
        else:
            self.sent = service_pb2.OptimizeRequest(
                resume_run_id=resume, resume_capabilities=self.capabilities()
            )
        return self.sent

    def checked(self, request: service_pb2.OptimizeRequest, limit: int) -> Any:
        """`request`, refused when over the message limit, naming the caller's argument
        (x0 for the start's initial_params)."""
        try:
            check_fits(request, limit)
        except HessianError as exc:
            raise self.renamed(exc) from None
        return request

    def capabilities(self) -> service_pb2.Capabilities:
        """What this caller can evaluate besides the loss."""
        return service_pb2.Capabilities(
            gradient=self.jac is True or callable(self.jac),
            hessian=callable(self.hess),
            hvp=callable(self.hessp),
        )

    def _loss_and_grad(self, x: np.ndarray, need_grad: bool) -> tuple[float, np.ndarray | None]:
        """fun (and jac) at x. Each of the caller's functions gets its own copy of x, as SciPy
        gives it: one that changes its argument in place left the point evaluated next (and
        the callback's) somewhere else."""
        self.counts["nfev"] += 1
        if self.jac is True:
            both = self.fun(x.copy(), *self.args)
            try:
                f, g = both
            except (TypeError, ValueError):  # not a pair (SciPy reads fg[0], fg[1])
                raise invalid("fun", "(f, g) with jac=True", type(both).__name__) from None
            if need_grad:
                self.counts["njev"] += 1
            return _scalar(f, "fun"), _shaped(g, (x.size,), "jac") if need_grad else None
        f = _scalar(self.fun(x.copy(), *self.args), "fun")
        if not need_grad or not math.isfinite(f):  # a diverged point: nothing else is read
            return f, None
        self.counts["njev"] += 1
        return f, _shaped(self.jac(x.copy(), *self.args), (x.size,), "jac")

    def _hessp(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        """hessp(x, v): H v, refused naming hessp unless it has x's shape (n,)."""
        expected = f"H v of shape ({x.size},), like x"
        hv = _numbers(self.hessp(x.copy(), v.copy(), *self.args), "hessp", expected)
        if hv.shape != x.shape:
            raise invalid("hessp", expected, hv.shape)
        return hv

    def evaluate(self, ask: Any) -> service_pb2.OptimizeRequest:
        """The Evaluation answering `ask` (the caller's functions run here)."""
        self.counts["round_trips"] += 1
        x = decode(ask.point).astype(np.float64)
        out = service_pb2.Evaluation(request_id=ask.request_id)
        values: dict[str, Any] = {}
        g = None
        if ask.loss or ask.gradient:
            f, g = self._loss_and_grad(x, ask.gradient)
            out.loss = values["fun"] = f
            if ask.loss and not math.isfinite(f):
                # the server rejects the trial and reads nothing else at a point where the loss
                # is not finite: jac/hess are not asked there (they may be undefined there)
                self.seen.setdefault(x.tobytes(), {}).update(values)
                return service_pb2.OptimizeRequest(evaluation=out)
        if g is not None:
            out.gradient.CopyFrom(encode(g))
            values["jac"] = g
            self.last_full = x
            if self.iterate is None:  # the run's (or the resumed checkpoint's) first point
                self.iterate = x
        if ask.hessian:
            self.counts["nhev"] += 1
            h = _shaped(self.hess(x.copy(), *self.args), (x.size, x.size), "hess")
            out.hessian.CopyFrom(encode(h))
            values["hess"] = h
        if ask.HasField("hvp_vectors"):
            vectors = decode(ask.hvp_vectors)
            self.counts["nhev"] += len(vectors)
            hv = np.stack([self._hessp(x, v) for v in vectors])
            out.hvps.CopyFrom(encode(hv))
            # products with every unit vector are the Hessian's columns (CG directions are not)
            unit = len(vectors) == x.size and np.array_equal(vectors, np.eye(x.size))
            values["hess"] = 0.5 * (hv + hv.T) if unit else None
        self.seen.setdefault(x.tobytes(), {}).update(values)
        return service_pb2.OptimizeRequest(evaluation=out)

    def on_response(self, response: Any) -> service_pb2.OptimizeRequest | None:
        """The request answering `response`, if any (records go to the callback first)."""
        kind = response.WhichOneof("kind")
        if kind == "started":
            self.run_id = response.started.run_id
        stop = self._callbacks(response.records)
        if kind == "finished":
            self.finished = response.finished
            if self.finished.status == service_pb2.RUN_STATUS_INTERRUPTED:
                raise _interrupted(self.finished)
            return None
        if stop:
            return service_pb2.OptimizeRequest(stop=True)
        if kind == "evaluate":
            return self.evaluate(response.evaluate)
        return None

    def _callbacks(self, records: Any) -> bool:
        if self.callback is None or self.stop_asked:
            return False
        for record in records:
            x = self.iterate
            if record.step_accepted:  # the step's point was evaluated before this record
                self.iterate = self.last_full
            intermediate = OptimizeResult(x=x.copy(), fun=record.loss, nit=record.iteration)
            try:
                returned = self.callback(intermediate)
            except StopIteration:
                self.stop_asked, self.stopped_at = True, intermediate
                return True
            if inspect.isawaitable(returned):  # an async callback called where none awaits it
                with contextlib.suppress(AttributeError):
                    returned.close()
                raise invalid("callback", f"a function, not one returning an awaitable "
                              f"{ASYNC_NOTE}", type(returned).__name__)  # fmt: skip
        return False

    def result(self) -> OptimizeResult:
        info = self.finished
        x = decode(info.final_params).astype(np.float64).reshape(-1)
        fun = info.last_record.loss if info.HasField("last_record") else None
        nit = info.last_record.iteration
        status_name = service_pb2.RunStatus.Name(info.status).removeprefix("RUN_STATUS_")
        stopped = self.stopped_at if info.status == service_pb2.RUN_STATUS_CANCELLED else None
        if stopped is not None:  # SciPy's: the iterate the callback stopped at, not a later one
            x, fun, nit = stopped.x, stopped.fun, stopped.nit
            status, message = CALLBACK_STOP_STATUS, "`callback` raised `StopIteration`."
        elif info.converged:
            status, message = 0, info.message
        elif info.stop_reason == optimize_pb2.STOP_REASON_MAX_ITERATIONS:
            status, message = 1, info.message
        else:
            status, message = 2, info.message or status_name
        at_x = self.seen.get(x.tobytes(), {})
        result = OptimizeResult(
            x=x,
            fun=at_x.get("fun") if fun is None else fun,
            jac=at_x.get("jac"),
            hess=at_x.get("hess"),
            nit=nit,
            status=status,
            success=bool(info.converged),
            message=message,
            run_id=info.run_id,
            run_status=status_name,
            **self.counts,
        )
        if self.disp and result.fun is not None:
            print(
                f"{message}\n         Current function value: {result.fun:.6f}\n"
                f"         Iterations: {nit}\n         Function evaluations: {result.nfev}\n"
                f"         Gradient evaluations: {result.njev}\n"
                f"         Hessian evaluations: {result.nhev}"
            )
        return result


def _check_derivatives(jac: Any, hess: Any, hessp: Any) -> None:
    """Refuse, naming it, a derivative given as anything but a function (jac also True: fun
    returns (f, g)): SciPy's finite differences ('2-point', ...) and quasi-Newton updates
    (BFGS()) are not offered, and must not be ignored; every method needs the gradient."""
    if not (jac is True or callable(jac)):
        raise invalid(
            "jac",
            "a function of x or True (fun returns (f, g)): every method needs the gradient "
            "(finite differences are not offered)",
            jac,
        )
    for name, value in (("hess", hess), ("hessp", hessp)):
        if value is not None and not callable(value):
            raise invalid(name, "a function of x (finite differences are not offered)", value)


def _interrupted(info: Any) -> Exception:
    """The error of a run the server left INTERRUPTED (this caller missed
    --optimize-evaluation-seconds, or the server shut down): no result, as when the stream
    breaks; the run id and how to resume are added by the driver."""
    shutdown = info.stop_reason == optimize_pb2.STOP_REASON_SHUTDOWN
    return (Unavailable if shutdown else DeadlineExceeded)(info.message or "run interrupted")


def _stream_error(exc: grpc.RpcError, session: _Session) -> Exception:
    """The typed error of a broken stream, carrying the run id to resume ("" if none), and
    saying so as an error raised on this side does."""
    # a request over the server's message limit names its field (x0 for the start)
    error = session.renamed(call_error(exc, session.sent))
    error.run_id = session.run_id  # type: ignore[attr-defined]
    if session.run_id and error.code in RESUMABLE_CODES:
        error.add_note(
            f"run {session.run_id} is INTERRUPTED at its last checkpoint (or will be, once "
            f"the server sees the stream gone); resume={session.run_id!r} continues it"
        )
    return error


def _left_interrupted(exc: Exception, session: _Session) -> None:
    """Give an error raised on this side of the stream the run id, as a broken stream's has:
    the run is INTERRUPTED at its last checkpoint, and resume=run_id continues it."""
    if not session.run_id:
        return
    with contextlib.suppress(AttributeError):  # an exception type that takes no attributes
        exc.run_id = session.run_id  # type: ignore[attr-defined]
    exc.add_note(
        f"run {session.run_id} is INTERRUPTED at its last checkpoint; "
        f"resume={session.run_id!r} continues it"
    )


def minimize(
    fun: Callable[..., Any],
    x0: Any,
    args: tuple = (),
    method: str | None = None,
    jac: Any = None,
    hess: Callable[..., Any] | None = None,
    hessp: Callable[..., Any] | None = None,
    bounds: Any = None,
    constraints: Any = (),
    tol: float | None = None,
    callback: Callable[[OptimizeResult], Any] | None = None,
    options: dict[str, Any] | None = None,
    *,
    address: str | None = None,
    token: str | None = None,
    name: str = "",
    resume: str | None = None,
    **unserved: Any,
) -> OptimizeResult:
    """Minimise `fun` from `x0` on the server, SciPy-style (jac=True: fun returns (f, g)).

    `options`: SciPy's maxiter / gtol, the server's stopping criteria and method options,
    and speculative (default True: each step's first trial asks for everything a new point
    needs: one round trip per accepted full step, a wasted gradient/Hessian per rejected
    first trial; False: trials ask the loss alone, two round trips per accepted step).
    `resume`: the id of an INTERRUPTED Optimize run to continue (same functions; the run
    keeps the method, options and stopping criteria it was started with, so those given
    here are not used); a broken stream raises a HessianError whose `run_id` names it.
    Returns SciPy's fields (x, fun, jac, hess, nit, nfev, njev, nhev, status, success,
    message) and run_id, run_status, round_trips (evaluation requests answered).
    """
    refuse_unserved(unserved, MINIMIZE_ARGUMENTS, OPTION_KEYS)
    _unconstrained(bounds, constraints)
    session = _Session(fun, x0, args, jac, hess, hessp, method, tol, callback, options, name)
    return drive(session, resume, address, token)


def drive(session: _Session, resume: str | None, address: str | None, token: str | None) -> Any:
    """Run `session` over one Optimize stream (or resume run `resume`); its result."""
    outgoing: queue.Queue[service_pb2.OptimizeRequest | None] = queue.Queue()
    first = session.first_request(resume)

    def requests() -> Any:
        while (request := outgoing.get()) is not None:
            yield request

    session.refuse_coroutines()
    with Client(address, token, timeout=None) as client:
        outgoing.put(session.checked(first, client.max_message_bytes))
        call = client.stub.Optimize(requests(), metadata=client.metadata)
        try:
            for response in call:
                reply = session.answer(response)
                if reply is not None:
                    outgoing.put(session.checked(reply, client.max_message_bytes))
        except grpc.RpcError as exc:
            raise _stream_error(exc, session) from None
        except BaseException as exc:  # the caller's functions (Ctrl-C too), or a refused reply
            _left_interrupted(exc, session)
            raise
        finally:
            outgoing.put(None)
    return session.result()


async def minimize_async(
    fun: Callable[..., Any],
    x0: Any,
    args: tuple = (),
    method: str | None = None,
    jac: Any = None,
    hess: Callable[..., Any] | None = None,
    hessp: Callable[..., Any] | None = None,
    bounds: Any = None,
    constraints: Any = (),
    tol: float | None = None,
    callback: Callable[[OptimizeResult], Any] | None = None,
    options: dict[str, Any] | None = None,
    *,
    address: str | None = None,
    token: str | None = None,
    name: str = "",
    resume: str | None = None,
    **unserved: Any,
) -> OptimizeResult:
    """`minimize` on grpc.aio: the stream waits without blocking the event loop. Plain
    functions run on the loop; `async def` ones (fun, jac, hess, hessp, callback) are
    awaited on it, and the evaluation around them (with any plain function beside them)
    then runs on a worker thread."""
    refuse_unserved(unserved, MINIMIZE_ARGUMENTS, OPTION_KEYS)
    _unconstrained(bounds, constraints)
    session = _Session(fun, x0, args, jac, hess, hessp, method, tol, callback, options, name)
    return await drive_async(session, resume, address, token)


async def _write_unless_ended(call: Any, reply: Any) -> None:
    """Send `reply`, unless the server has ended the stream meanwhile (the run was cancelled,
    or the reply came after the evaluation deadline): its last responses and status are then
    read as the sync stream reads them, not grpc's "Internal error from Core" of the write."""
    try:
        await call.write(reply)
    except (grpc.RpcError, asyncio.InvalidStateError):
        if not call.done():
            raise


async def drive_async(
    session: _Session, resume: str | None, address: str | None, token: str | None
) -> Any:
    """`drive` on grpc.aio."""
    first = session.first_request(resume)  # its arguments refused before any call
    bridge = session.bridge(asyncio.get_running_loop())
    try:
        async with AsyncClient(address, token, timeout=None) as client:
            session.checked(first, client.max_message_bytes)
            call = client.stub.Optimize(metadata=client.metadata)
            try:
                await call.write(first)
                async for response in call:
                    if bridge is not None:  # it waits on coroutines of this loop: not on it
                        reply = await bridge.run(session.answer, response)
                    else:
                        reply = session.answer(response)
                    if reply is not None:
                        reply = session.checked(reply, client.max_message_bytes)
                        await _write_unless_ended(call, reply)
                await call.done_writing()
            except grpc.RpcError as exc:
                raise _stream_error(exc, session) from None
            except BaseException as exc:  # the caller's functions (Ctrl-C, a cancelled task)
                _left_interrupted(exc, session)
                raise
        # the result may evaluate the caller's functions again (least_squares' r and J)
        return await bridge.run(session.result) if bridge is not None else session.result()
    finally:
        if bridge is not None:  # nothing of the caller's runs after this call has ended
            bridge.close()
