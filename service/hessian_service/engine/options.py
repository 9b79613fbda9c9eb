"""Method options and stopping criteria, validated once, with Ceres/SciPy-style defaults."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .budget import DEFAULT_DENSE_BUDGET_BYTES, check_dense_budget, dense_hessian_bytes
from .errors import UnknownNameError, ValidationError
from .validation import require_int, require_no_extra

METHODS = ("gradient_descent", "newton", "saddle_free", "newton_cg", "gauss_newton_cg", "auto")
HESSIAN_FREE_METHODS = ("newton_cg", "gauss_newton_cg")
DENSE_METHODS = ("newton", "saddle_free")  # the methods that hold an n x n matrix
# The step policies each method takes, its default first: globalised (Armijo line search,
# a trust region) for every second-order method, as SciPy, Ceres and scikit-learn default;
# fixed (x <- x + lr d) only when asked for (and for gradient descent, by learning rate).
METHOD_STEP_POLICIES = {
    "gradient_descent": ("fixed", "line_search"),
    "newton": ("line_search", "fixed", "levenberg_marquardt"),
    "saddle_free": ("line_search", "fixed"),
    "newton_cg": ("trust_region", "line_search", "fixed"),
    "gauss_newton_cg": ("trust_region", "line_search", "fixed"),
}
STEP_POLICIES = ("fixed", "line_search", "levenberg_marquardt", "trust_region")
# method auto may resolve to newton or newton_cg: it takes the policies both take
AUTO_STEP_POLICIES = tuple(
    p
    for p in STEP_POLICIES
    if p in METHOD_STEP_POLICIES["newton"] and p in METHOD_STEP_POLICIES["newton_cg"]
)
CG_FORCINGS = ("eisenstat_walker", "fixed")
HVP_MODES = ("forward_over_reverse", "reverse_over_reverse")
CURVATURES = ("hessian", "gauss_newton")
BACKENDS = ("auto", "native", "autograd")
BACKEND_ENV = "HESSIAN_BACKEND"  # the engine's backend where a call names none
DEFAULT_LEARNING_RATE = {"gradient_descent": 0.1}
# a line search's trials per step: 0.5^1074 is below the smallest float64, and a factor near
# 1 needs more; past it a step's time has no use (each trial is a loss evaluation)
MAX_BACKTRACKS = 10_000
# the options validated > 0 that scale tensors of the compute dtype (check_dtype_range)
POSITIVE_SCALES = ("learning_rate", "eigenvalue_floor", "trust_radius")
DEFAULT_PARAMETER_TOLERANCE = 1e-8
DEFAULT_GRADIENT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-6}


def _real(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(name, "a real number", repr(value))
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValidationError(name, "a finite number", repr(value))
    if positive and value <= 0:
        raise ValidationError(name, "a number > 0", repr(value))
    if nonnegative and value < 0:
        raise ValidationError(name, "a number >= 0", repr(value))
    return value


def requested_backend(backend: str | None) -> str:
    """The backend a call asks for: its own, else $HESSIAN_BACKEND, else auto (a value of
    that variable that names no backend is refused under its own name, not the call's)."""
    if backend:
        return backend
    configured = os.environ.get(BACKEND_ENV) or "auto"
    if configured not in BACKENDS:
        raise UnknownNameError(f"${BACKEND_ENV}", configured, list(BACKENDS))
    return configured


@dataclass(frozen=True)
class MethodOptions:
    """How each step is computed.

    method: gradient_descent | newton | saddle_free | newton_cg | gauss_newton_cg (Hessian-free,
    see hessian_free.py) | auto (newton when the dense Hessian fits dense_budget_bytes, else
    newton_cg, and newton_cg when a fraction below 1 asks for sub-sampling; `resolve_method`
    says which and why).
    step_policy: fixed (x <- x + lr d), line_search (Armijo backtracking from lr),
    levenberg_marquardt (Newton only; adaptive damping, Nielsen's update), trust_region
    (Hessian-free only: Steihaug-Toint); METHOD_STEP_POLICIES lists each method's. None:
    the method's default, globalised for second-order methods (line_search for newton and
    saddle_free, trust_region for Hessian-free), fixed for gradient descent.
    learning_rate: the fixed step size or the line search's first trial (default 1, and
    0.1 for gradient descent). damping: the initial lambda in (H + lambda I); for
    levenberg_marquardt, in (H + lambda diag H) (Marquardt's scaling), and 0 means 1e-3.
    curvature: hessian or gauss_newton. eigenvalue_floor (saddle_free): |lambda| is floored
    at eigenvalue_floor x max|lambda| (relative: the step does not depend on the units;
    None: the dtype's eps, so a definite H of any conditioning the dtype resolves gets
    Newton's step).
    backend: auto | native | autograd (None: $HESSIAN_BACKEND, else auto). For the
    Hessian-free methods, auto and native take the closed-form native curvature products
    (backends/native/products.py) where they cover the objective; hvp_mode is then unused.
    Hessian-free only: cg_max_iterations, cg_forcing (eisenstat_walker: adaptive inner
    tolerance floored at cg_tolerance; fixed: cg_tolerance), trust_radius (initial),
    curvature_fraction (share of data rows the curvature products use, drawn each step
    from `seed`), hvp_mode (reverse_over_reverse, the default: one retained double-backward
    graph per step, 1.3-1.4x a gradient per product in BENCHMARKS.md; forward_over_reverse:
    torch.func vjp of grad (no forward-mode AD), nothing kept between products),
    gradient_fraction (share of data rows in the mini-batch whose gradient each step's CG
    uses, drawn afresh each step from `seed`; the curvature rows then come from within it;
    1: the full gradient; below 1 no full gradient is computed: the records' gradient norms
    and the gradient_tolerance stop are the batch gradient's, the loss stays the full one).
    gauss_newton_cg is newton_cg with curvature gauss_newton.
    """

    method: str = "newton"
    step_policy: str | None = None
    learning_rate: float | None = None
    damping: float = 0.0
    curvature: str = "hessian"
    eigenvalue_floor: float | None = None
    armijo: float = 1e-4
    backtrack: float = 0.5
    max_backtracks: int = 40
    backend: str | None = None
    dense_budget_bytes: int | None = DEFAULT_DENSE_BUDGET_BYTES
    cg_max_iterations: int = 100
    cg_tolerance: float = 1e-6
    cg_forcing: str = "eisenstat_walker"
    trust_radius: float = 1.0
    curvature_fraction: float = 1.0
    seed: int = 0
    hvp_mode: str = "reverse_over_reverse"
    gradient_fraction: float = 1.0

    @classmethod
    def from_dict(cls, values: dict[str, Any], field_prefix: str = "options") -> MethodOptions:
        """Build from a dict, rejecting unknown keys by name."""
        require_no_extra(values, {f.name for f in fields(cls)}, field_prefix)
        return cls(**values).validated(field_prefix)

    def validated(self, field_prefix: str = "options") -> MethodOptions:
        """Check every field; fill the learning-rate and backend defaults."""
        p = field_prefix
        if self.method not in METHODS:
            raise UnknownNameError(f"{p}.method", self.method, list(METHODS))
        hessian_free = self.method in HESSIAN_FREE_METHODS
        policy = self.step_policy
        if policy is not None and policy not in STEP_POLICIES:
            raise UnknownNameError(f"{p}.step_policy", policy, list(STEP_POLICIES))
        allowed = METHOD_STEP_POLICIES.get(self.method) or AUTO_STEP_POLICIES
        if policy is None and self.method != "auto":  # auto's default: its resolved method's
            policy = allowed[0]
        if policy is not None and policy not in allowed:
            raise ValidationError(
                f"{p}.step_policy", f"one of {list(allowed)} for method {self.method}", repr(policy)
            )
        if self.curvature not in CURVATURES:
            raise UnknownNameError(f"{p}.curvature", self.curvature, list(CURVATURES))
        curvature = "gauss_newton" if self.method == "gauss_newton_cg" else self.curvature
        backend = requested_backend(self.backend)
        if backend not in BACKENDS:
            raise UnknownNameError(f"{p}.backend", backend, list(BACKENDS))
        lr = self.learning_rate
        if lr is None and self.method != "auto":  # auto's default: its resolved method's
            lr = DEFAULT_LEARNING_RATE.get(self.method, 1.0)
        if lr is not None:
            lr = _real(f"{p}.learning_rate", lr, positive=True)
        _real(f"{p}.damping", self.damping, nonnegative=True)
        floor = self.eigenvalue_floor
        if floor is not None and not 0 < _real(f"{p}.eigenvalue_floor", floor) <= 1:
            # relative to max|lambda|: past 1 every |lambda| is floored, the "Newton" step a
            # gradient step of lr / (floor max|lambda|) (1e300: one tiny step, then a stall)
            raise ValidationError(
                f"{p}.eigenvalue_floor", "a fraction in (0, 1] of the largest |eigenvalue|",
                repr(floor),
            )  # fmt: skip
        if not 0 < _real(f"{p}.armijo", self.armijo) < 1:
            raise ValidationError(f"{p}.armijo", "a number in (0, 1)", repr(self.armijo))
        if not 0 < _real(f"{p}.backtrack", self.backtrack) < 1:
            raise ValidationError(f"{p}.backtrack", "a number in (0, 1)", repr(self.backtrack))
        require_int(f"{p}.max_backtracks", self.max_backtracks, 1, MAX_BACKTRACKS)
        budget = self.dense_budget_bytes
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0
        ):
            raise ValidationError(f"{p}.dense_budget_bytes", "a positive integer", repr(budget))
        require_int(f"{p}.cg_max_iterations", self.cg_max_iterations, 1)
        require_int(f"{p}.seed", self.seed, 0)
        if not 0 < _real(f"{p}.cg_tolerance", self.cg_tolerance) < 1:
            raise ValidationError(
                f"{p}.cg_tolerance", "a number in (0, 1)", repr(self.cg_tolerance)
            )
        if self.cg_forcing not in CG_FORCINGS:
            raise UnknownNameError(f"{p}.cg_forcing", self.cg_forcing, list(CG_FORCINGS))
        _real(f"{p}.trust_radius", self.trust_radius, positive=True)
        if self.hvp_mode not in HVP_MODES:
            raise UnknownNameError(f"{p}.hvp_mode", self.hvp_mode, list(HVP_MODES))
        if not 0 < _real(f"{p}.curvature_fraction", self.curvature_fraction) <= 1:
            raise ValidationError(
                f"{p}.curvature_fraction", "a number in (0, 1]", repr(self.curvature_fraction)
            )
        if not 0 < _real(f"{p}.gradient_fraction", self.gradient_fraction) <= 1:
            raise ValidationError(
                f"{p}.gradient_fraction", "a number in (0, 1]", repr(self.gradient_fraction)
            )
        if self.curvature_fraction < 1 and not (hessian_free or self.method == "auto"):
            raise ValidationError(
                f"{p}.curvature_fraction",
                f"1 for {self.method} (sub-sampled curvature is for newton_cg/gauss_newton_cg)",
                repr(self.curvature_fraction),
            )
        if self.gradient_fraction < 1 and not (hessian_free or self.method == "auto"):
            raise ValidationError(
                f"{p}.gradient_fraction",
                f"1 for {self.method} (mini-batch gradients are for newton_cg/gauss_newton_cg)",
                repr(self.gradient_fraction),
            )
        return replace(
            self, learning_rate=lr, backend=backend, step_policy=policy, curvature=curvature
        )


def resolve_method(
    options: MethodOptions, num_params: int, dtype: Any = None
) -> tuple[MethodOptions, str]:
    """Resolve method auto by size: newton if the dense Hessian fits the budget, else newton_cg.

    A curvature_fraction or gradient_fraction below 1 asks for sub-sampling, which only the
    Hessian-free methods do: auto then chooses newton_cg whatever the size. Returns the
    (validated) options with a concrete method and a message saying what was chosen and why
    ("" when the method was not auto).
    """
    if options.method != "auto":
        return options, ""
    sampled = [
        f"{name} {getattr(options, name):g}"
        for name in ("curvature_fraction", "gradient_fraction")
        if getattr(options, name) < 1
    ]
    if sampled:
        message = (
            f"method auto chose newton_cg: {' and '.join(sampled)} below 1 asks for "
            "sub-sampling, which only the Hessian-free methods do"
        )
        return _chosen(options, "newton_cg", message), message
    need = dense_hessian_bytes(num_params, dtype) if dtype is not None else 8 * num_params**2
    budget = options.dense_budget_bytes
    method = "newton" if budget is None or need <= budget else "newton_cg"
    message = (
        f"method auto chose {method}: a dense Hessian of {num_params:,} parameters needs "
        f"{need:,} bytes"
    )
    if budget is None:
        message += ", and dense_budget_bytes is None (no limit)"
    else:
        why = "within" if method == "newton" else "over"
        message += f", {why} the dense-Hessian budget of {budget:,} bytes (dense_budget_bytes)"
    if method == "newton_cg":
        message += "; Newton-CG uses Hessian-vector products in O(n) memory"
    return _chosen(options, method, message), message


def _chosen(options: MethodOptions, method: str, why: str) -> MethodOptions:
    """`options` with the method auto chose, validated; a refusal then says auto chose it."""
    try:
        return replace(options, method=method).validated()
    except ValidationError as exc:
        exc.args = (f"{exc} ({why})",)
        raise


def check_method_budget(
    options: MethodOptions, n: int, dtype: Any, field: str = "options.dense_budget_bytes"
) -> None:
    """Refuse, before anything is computed or stored, a dense method (DENSE_METHODS) whose
    n x n matrix is over options.dense_budget_bytes (ResourceLimitError naming `field`); the
    other methods hold no such matrix."""
    if options.method in DENSE_METHODS:
        check_dense_budget(n, options.dense_budget_bytes, dtype, field)


def lm_damping_cap(dtype: torch.dtype, norm: float = 1.0) -> float:
    """The largest Levenberg-Marquardt lambda: max(norm, 1) / eps(dtype), `norm` the
    infinity norm of the scaled matrix S^-1 H S^-1 it damps (Marquardt's scaling,
    solvers.methods.marquardt_scale; its diagonal is at most 1 in magnitude, an indefinite
    H's off-diagonal may be larger). Beyond it that matrix + lambda I is lambda I in floating
    point and each coordinate's step, g_i / (lambda D_i), is below eps times its own Newton
    step: more damping cannot produce a different trial. A requested damping is held to
    the cap with norm 1 (at the door there is no H; below it every H is damped alike).
    """
    return max(norm, 1.0) / torch.finfo(dtype).eps


def lm_damping_expected(cap: float) -> str:
    """What a Levenberg-Marquardt damping must be (the refusal's "expected")."""
    return (
        f"a Levenberg-Marquardt damping <= 1 / eps = {cap:.3g} (it scales diag H; past it "
        "the damped step is below the rounding of params)"
    )


def check_dtype_range(options: MethodOptions, dtype: torch.dtype, prefix: str = "options") -> None:
    """Refuse a float option the compute dtype cannot hold: past its largest (float32 past
    3.4e38) it would overflow the tensors it scales (a learning rate, a damping, a floor, a
    radius), and one of the positive scales under its smallest (float32 under 1.4e-45)
    rounds to 0 there, a step of zero or a zero floor, not at the door; and a
    Levenberg-Marquardt damping past lm_damping_cap, where no trial can differ."""
    refusal = _dtype_range_refusal(options, dtype)
    if refusal is not None:
        field, expected, got = refusal
        raise ValidationError(f"{prefix}.{field}", expected, got)


@functools.lru_cache(maxsize=256)
def _dtype_range_refusal(options: MethodOptions, dtype: torch.dtype) -> tuple[str, str, str] | None:
    """check_dtype_range's verdict as (field, expected, got), or None: cached, since every
    step of a run or a repeated call checks the same options (a float32 check walks all)."""
    info = torch.finfo(dtype)
    cap = lm_damping_cap(dtype)
    if options.step_policy == "levenberg_marquardt" and options.damping > cap:
        return "damping", lm_damping_expected(cap), f"{options.damping:.4g}"
    if info.max >= sys.float_info.max:
        return None  # every finite option fits (validation refused the others)
    name = str(dtype).removeprefix("torch.")
    rounds_to_zero = info.smallest_normal * info.eps / 2  # half the smallest subnormal
    for f in fields(options):
        value = getattr(options, f.name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and abs(value) > info.max:
            return f.name, f"a value {name} can hold (|x| <= {info.max:.4g})", f"{value:.4g}"
        if number and f.name in POSITIVE_SCALES and abs(value) <= rounds_to_zero:
            expected = f"a value {name} can hold (> {rounds_to_zero:.4g}; {name} rounds it to 0)"
            return f.name, expected, f"{value:.4g}"
    return None


@dataclass(frozen=True)
class StopCriteria:
    """When a run ends (Ceres' names; a tolerance of 0 disables that test).

    gradient_tolerance: max|g| <= tol, the first-order condition: the one *converged* stop
    (max|g| of the step's mini-batch gradient under gradient_fraction < 1). The other two
    say the run *stalled* (progress too small while the gradient test is not met):
    function_tolerance: |f_k - f_{k-1}| <= tol * |f_{k-1}|; parameter_tolerance:
    ||x_k - x_{k-1}|| <= tol * (||x_{k-1}|| + tol). Defaults: gradient None: 1e-10 in
    float64, 1e-6 in float32 (DEFAULT_GRADIENT_TOLERANCE: a float32 gradient of an O(1)
    loss carries rounding of a few eps32 ~ 1e-7, so 1e-10 could never be met); function 0
    (off: a small loss change is what a small learning rate or a flat stretch gives, not a
    stall); parameter None: 1e-8 (Ceres') for second-order methods, whose step minimises a
    model, and 0 (off) for gradient descent, whose step is only lr x gradient.
    max_iterations counts steps (a run yields max_iterations + 1 records at most).
    """

    max_iterations: int = 100
    gradient_tolerance: float | None = None
    function_tolerance: float = 0.0
    parameter_tolerance: float | None = None
    time_limit_seconds: float | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any], field_prefix: str = "stopping") -> StopCriteria:
        """Build from a dict, rejecting unknown keys by name."""
        require_no_extra(values, {f.name for f in fields(cls)}, field_prefix)
        return cls(**values).validated(field_prefix)

    def validated(self, field_prefix: str = "stopping") -> StopCriteria:
        """Check every field."""
        p = field_prefix
        require_int(f"{p}.max_iterations", self.max_iterations, 0)
        for name in ("gradient_tolerance", "function_tolerance", "parameter_tolerance"):
            if getattr(self, name) is not None:
                _real(f"{p}.{name}", getattr(self, name), nonnegative=True)
        if self.time_limit_seconds is not None:
            _real(f"{p}.time_limit_seconds", self.time_limit_seconds, positive=True)
        return self

    def for_method(self, method: str, dtype: torch.dtype | None = None) -> StopCriteria:
        """These criteria with the defaults of the method (parameter_tolerance) and of the
        parameters' dtype (gradient_tolerance; None: float64's) filled in."""
        xtol, gtol = self.parameter_tolerance, self.gradient_tolerance
        if xtol is None:
            xtol = 0.0 if method == "gradient_descent" else DEFAULT_PARAMETER_TOLERANCE
        if gtol is None:
            gtol = DEFAULT_GRADIENT_TOLERANCE.get(dtype, DEFAULT_GRADIENT_TOLERANCE[torch.float64])
        return replace(self, parameter_tolerance=xtol, gradient_tolerance=gtol)
