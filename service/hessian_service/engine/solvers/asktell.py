"""Reverse communication: an objective the caller evaluates, asked point by point.

The run's worker thread asks (`Exchange.ask`: a point and the quantities it needs) and
blocks; whoever talks to the caller (the Optimize stream) takes the ask, answers it
(`Exchange.answer`) or gives up (`Exchange.lose`). `RemoteStepper` is the engine's
Stepper with evaluation routed through the exchange, so the Run driver, its stopping
tests, records and checkpoints run unchanged.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..cancel import Cancelled, CancelToken
from ..errors import EngineError, ValidationError
from ..objectives.base import Objective
from ..options import MethodOptions
from .methods import Point, Step, Stepper

HVP_DENSE_MAX = 64  # largest n whose dense Hessian is assembled from n batched HVPs
WAIT_SLICE_SECONDS = 0.05  # how often a waiting worker looks at its cancel token


@dataclass(frozen=True)
class Capabilities:
    """What the caller can evaluate besides the loss."""

    gradient: bool = False
    hessian: bool = False
    hvp: bool = False
    gauss_newton: bool = False  # Gauss-Newton-vector products J^T J v (a least-squares loss)


@dataclass
class Ask:
    """One evaluation request: the point, what is needed, and the vectors (k x n) of the
    Hessian-vector or Gauss-Newton-vector products asked, if any."""

    request_id: int
    point: torch.Tensor
    loss: bool = True
    gradient: bool = False
    hessian: bool = False
    hvp_vectors: torch.Tensor | None = None
    gn_vectors: torch.Tensor | None = None


@dataclass
class Answer:
    """The caller's values for one Ask (validated by whoever decodes them)."""

    loss: float
    gradient: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    hvps: torch.Tensor | None = None
    gn_products: torch.Tensor | None = None


class CallerLost(EngineError):
    """The caller went away or missed the evaluation deadline: the run is INTERRUPTED."""


@dataclass
class Exchange:
    """The one-ask-at-a-time hand-off between a run's worker thread and its caller's stream.

    `on_ask` (set by the stream while one is attached) is called from the worker with each
    new Ask; the stream answers it, or `fail`s the run with the error a bad reply made.
    """

    cancel: CancelToken
    deadline_seconds: float
    on_ask: Callable[[Ask], None] | None = None
    pending: Ask | None = None
    _answer: Answer | BaseException | None = None
    _fault: EngineError | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def attach(self, on_ask: Callable[[Ask], None]) -> None:
        """A stream takes over: future asks go to `on_ask`."""
        with self._cond:
            self.on_ask = on_ask

    def detach(self, on_ask: Callable[[Ask], None], reason: str) -> None:
        """The stream `on_ask` ended: the run waiting on it is interrupted with `reason`."""
        with self._cond:
            if self.on_ask is not on_ask:
                return
            self.on_ask = None
            if self._answer is None:  # a reply or a bad reply's error already delivered stays
                self._answer = CallerLost(reason)
            self._cond.notify_all()

    def answer(self, request_id: int, decode: Callable[[Ask], Answer]) -> None:
        """Answer Ask `request_id` with `decode(ask)`; ValidationError if it is not pending
        (or `decode` finds the reply bad)."""
        with self._cond:
            pending = self.pending
            if pending is None or pending.request_id != request_id:
                raise ValidationError(
                    "evaluation.request_id",
                    f"the id of the pending evaluation request "
                    f"({pending.request_id if pending else 'none is pending'})",
                    request_id,
                )
            self._answer, self.pending = decode(pending), None  # a second reply is to nothing
            self._cond.notify_all()

    def fail(self, error: EngineError) -> None:
        """A bad reply: the waiting ask (or, if none waits, the next one) raises `error`."""
        with self._cond:
            self._fault = self._answer = error
            self._cond.notify_all()

    def ask(self, ask_values: dict[str, Any]) -> Answer:
        """Post an Ask (worker thread) and wait for its Answer; raise CallerLost, Cancelled
        or the ValidationError a bad reply became."""
        with self._cond:
            if self._fault is not None:
                raise self._fault
            ask = Ask(next(self._ids), **ask_values)
            self.pending, self._answer = ask, None
            on_ask = self.on_ask
        if on_ask is None:
            self._cancelled_first()
            raise CallerLost("no caller is attached to evaluate the objective")
        on_ask(ask)
        waited_until = time.monotonic() + self.deadline_seconds
        with self._cond:
            while self._answer is None:
                if self.cancel.cancelled:
                    raise Cancelled(self.cancel.reason or "cancelled", "waiting for the caller")
                left = waited_until - time.monotonic()
                if left <= 0:
                    self.on_ask = None
                    raise CallerLost(
                        f"the caller did not answer evaluation request {ask.request_id} within "
                        f"{self.deadline_seconds:g} s (the per-evaluation deadline); resume the "
                        "run by opening Optimize with its run id"
                    )
                self._cond.wait(min(left, WAIT_SLICE_SECONDS))
            answer, self._answer = self._answer, None
        if isinstance(answer, CallerLost):
            self._cancelled_first()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _cancelled_first(self) -> None:
        """Raise Cancelled where the run was cancelled before its caller went away: a stop
        sent then the stream closed at once ended the run INTERRUPTED (resumable), the
        close having woken this thread before it saw the cancel."""
        if self.cancel.cancelled:
            raise Cancelled(self.cancel.reason or "cancelled", "waiting for the caller")


class RemoteObjective(Objective):
    """An objective of `num_params` parameters that the caller evaluates through `exchange`.

    It has no torch loss: `RemoteStepper` asks the exchange instead of differentiating.
    Its Gauss-Newton form is the caller's: with `capabilities.gauss_newton` the loss is
    0.5 ||r(x)||^2 of the caller's residuals and curvature products ask for J^T J v.
    `speculative`: each step's first trial asks everything a new point needs (one round
    trip per accepted full step; a rejected trial wastes a gradient and a Hessian).
    """

    name = "remote"
    described_as = "the caller's objective (Optimize)"

    def __init__(
        self,
        num_params: int,
        dtype: torch.dtype,
        capabilities: Capabilities,
        exchange: Exchange,
        speculative: bool = False,
    ) -> None:
        self.capabilities = capabilities
        self.speculative = speculative
        self.exchange = exchange
        super().__init__({}, {"num_params": num_params, "dtype": dtype})

    option_names = ("num_params", "dtype")
    stepper_class: type[Stepper]  # set below: the Run driver builds this Stepper

    def _setup(self, data: Any, options: Any) -> None:
        self.param_shape = (int(options["num_params"]),)
        self.dtype = options["dtype"]

    def require_curvature(self, kind: str, field: str = "options.curvature") -> None:
        """Gauss-Newton curvature needs the caller's Gauss-Newton-vector products."""
        if kind == "gauss_newton" and not self.capabilities.gauss_newton:
            raise ValidationError(
                "start.capabilities.gauss_newton", f"true for {field} gauss_newton", False
            )

    def product_at(self, params: torch.Tensor, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> B v at `params` (B = H, or J^T J for kind gauss_newton), one ask per product:
        CG's products are sequential."""
        point = params.detach().clone()
        vectors = "gn_vectors" if kind == "gauss_newton" else "hvp_vectors"

        def product(v: torch.Tensor) -> torch.Tensor:
            answer = self.exchange.ask({"point": point, "loss": False, vectors: v.reshape(1, -1)})
            return (answer.gn_products if kind == "gauss_newton" else answer.hvps)[0]

        return product

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        """Not differentiable here: evaluate through RemoteStepper (one ask, loss only)."""
        return torch.tensor(self.exchange.ask({"point": params.detach().clone()}).loss)


def dense_source(capabilities: Capabilities, n: int, curvature: str = "hessian") -> str | None:
    """Where a dense curvature matrix comes from: the caller's "hessian", n batched "hvp"s,
    n batched "gauss_newton" products (curvature gauss_newton), or None."""
    if curvature == "gauss_newton":
        return "gauss_newton" if capabilities.gauss_newton and n <= HVP_DENSE_MAX else None
    if capabilities.hessian:
        return "hessian"
    if capabilities.hvp and n <= HVP_DENSE_MAX:
        return "hvp"
    return None


def resolve_remote_method(
    options: MethodOptions, capabilities: Capabilities, n: int
) -> tuple[MethodOptions, str]:
    """Pick method auto from what the caller offers and n; refuse what cannot be served.

    A dense method needs its matrix: the Hessian, or n batched HVPs (or, for curvature
    gauss_newton, Gauss-Newton products) with n <= HVP_DENSE_MAX; every method needs the
    gradient; newton_cg needs HVPs, gauss_newton_cg Gauss-Newton products (one ask per CG
    product). Auto prefers the Hessian, then HVPs, then Gauss-Newton products.
    """
    if not capabilities.gradient:
        raise ValidationError(
            "start.capabilities.gradient", "true: every method needs the gradient", False
        )
    if options.method == "auto":
        return _auto(options, capabilities, n)
    gauss_newton = options.curvature == "gauss_newton"
    if gauss_newton and not capabilities.gauss_newton:
        what = (
            "gauss_newton_cg" if options.method == "gauss_newton_cg" else "curvature gauss_newton"
        )
        raise ValidationError("start.capabilities.gauss_newton", f"true for {what}", False)
    if options.method == "newton_cg" and not gauss_newton and not capabilities.hvp:
        raise ValidationError("start.capabilities.hvp", "true for method newton_cg", False)
    dense = options.method in ("newton", "saddle_free")
    if dense and dense_source(capabilities, n, options.curvature) is None:
        offers = (
            f"gauss_newton with n <= {HVP_DENSE_MAX} (or method gauss_newton_cg)"
            if gauss_newton
            else f"hessian, or hvp with n <= {HVP_DENSE_MAX},"
        )
        offered = [k for k in ("hessian", "hvp", "gauss_newton") if getattr(capabilities, k)]
        raise ValidationError(
            "start.capabilities",
            f"{offers} for method {options.method}",
            f"{' and '.join(offered) or 'the gradient alone'} with n = {n}",
        )
    return options, ""


def _auto(options: MethodOptions, capabilities: Capabilities, n: int) -> tuple[MethodOptions, str]:
    """Method auto's choice and the note saying why."""
    small = f"n = {n} <= {HVP_DENSE_MAX}" if n <= HVP_DENSE_MAX else f"n = {n} > {HVP_DENSE_MAX}"
    gn_only = not (capabilities.hessian or capabilities.hvp) and capabilities.gauss_newton
    if options.curvature == "gauss_newton" or gn_only:
        if not capabilities.gauss_newton:
            raise ValidationError(
                "start.capabilities.gauss_newton", "true for curvature gauss_newton", False
            )
        dense = dense_source(capabilities, n, "gauss_newton") is not None
        method = "newton" if dense else "gauss_newton_cg"
        why = f"the caller offers Gauss-Newton products and {small}"
        chosen = replace(options, method=method, curvature="gauss_newton")
    else:
        source = dense_source(capabilities, n)
        method = "newton" if source else "newton_cg" if capabilities.hvp else "gradient_descent"
        why = (
            "the caller offers the Hessian"
            if source == "hessian"
            else f"the caller offers HVPs and {small}"
            if capabilities.hvp
            else "the caller offers neither the Hessian nor HVPs"
        )
        chosen = replace(options, method=method)
        if method == "gradient_descent" and options.step_policy is None:
            # chosen for the caller, so globalised: a fixed step of the default size diverges
            # on Rosenbrock and oscillates on a quadratic of curvature 2 / learning_rate
            chosen = replace(chosen, step_policy="line_search")
            why += " (with a line search: auto never takes an unchecked fixed step)"
    return chosen.validated("start.options"), f"method auto chose {method}: {why}"


class RemoteStepper(Stepper):
    """A Stepper whose points and trials are evaluated by the caller through the exchange.

    evaluate asks loss + gradient (+ the Hessian, or n HVPs or Gauss-Newton products of the
    identity in one message, for dense methods); line-search, Levenberg-Marquardt and
    trust-region trials ask the loss alone, except a speculative objective's first trial of
    each step, which asks what evaluate would, so the accepted point needs no second round
    trip.
    """

    objective: RemoteObjective

    _first_trial = False
    _speculated: Point | None = None

    def step(self, point: Point) -> Step:
        self._first_trial, self._speculated = self.objective.speculative, None
        return super().step(point)

    def evaluate(self, x: torch.Tensor) -> Point:
        speculated, self._speculated = self._speculated, None
        if speculated is not None and torch.equal(speculated.x, x):
            return Point(x, speculated.loss, speculated.grad, speculated.curvature)
        return self._ask_point(x)

    def _ask_point(self, x: torch.Tensor) -> Point:
        n = x.numel()
        ask: dict[str, Any] = {"point": x.detach().clone(), "gradient": True}
        capabilities, curvature = self.objective.capabilities, self.options.curvature
        source = dense_source(capabilities, n, curvature) if self.second_order else None
        if source == "hessian":
            ask["hessian"] = True
        elif source is not None:
            ask["gn_vectors" if source == "gauss_newton" else "hvp_vectors"] = torch.eye(
                n, dtype=x.dtype
            )
        answer = self.objective.exchange.ask(ask)
        h = None
        if source == "hessian":
            h = answer.hessian
        elif source is not None:  # rows B e_i; symmetrised like the engine
            rows = answer.gn_products if source == "gauss_newton" else answer.hvps
            h = 0.5 * (rows + rows.T)
        return Point(x, float(answer.loss), answer.gradient, h)

    def first_trial(self, x: torch.Tensor) -> float:
        """The caller is asked what `loss_at` asks (its own speculation, not the engine's)."""
        return self.loss_at(x)

    def whole_trial(self, x: torch.Tensor) -> Point | None:
        """The speculated point when it is `x`; else the caller is asked for it (at machine
        precision only), kept for `evaluate`."""
        speculated = self._speculated
        if speculated is None or not torch.equal(speculated.x, x):
            speculated = self._speculated = self._ask_point(x)
        return speculated

    def loss_at(self, x: torch.Tensor) -> float:
        if self._first_trial:  # speculative: ask the trial for all a new point needs
            self._first_trial = False
            self._speculated = self._ask_point(x)
            return self._speculated.loss
        return float(self.objective.exchange.ask({"point": x.detach().clone()}).loss)


RemoteObjective.stepper_class = RemoteStepper
