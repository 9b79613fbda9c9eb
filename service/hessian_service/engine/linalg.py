"""Dense linear algebra on a curvature matrix: damped Cholesky, saddle-free, eigenvalue tests.

Both solves solve H d = -g for a direction d. The damped Cholesky factorises H + lambda I,
raising lambda geometrically until the factorisation succeeds (the matrix is positive
definite), so an indefinite or singular H never yields NaN; never `torch.inverse`.
It imports nothing of the engine, so it sits in the base layer: the autograd backend's
`solve` is these functions, the native backend reports through `SolveResult`, and the
solvers and the analysis share the eigenvalue counts and the second-order verdict, and every
line search (the general path's and the fused native step's) the same Armijo test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_DAMPING_ATTEMPTS = 60
ROUNDING_ULPS = 16.0  # loss changes within this many ulps of the loss count as rounding
# up to this many entries all_finite sums Python floats instead of one torch reduction
PYTHON_SUM_MAX = 64


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of `t` is finite. A finite sum proves it (inf and NaN never cancel
    back): in Python floats for a small CPU tensor (under a microsecond, where isfinite's
    mask and all() cost ~5 us of dispatch, more than the seed's whole fused step), else in
    one torch reduction; a sum that overflows from finite entries (or fsum's -inf + inf)
    falls through to the exact test."""
    try:
        small = t.numel() <= PYTHON_SUM_MAX and t.is_cpu
        total = math.fsum(t.reshape(-1).tolist()) if small else float(t.sum())
    except (OverflowError, ValueError):  # fsum's intermediate overflow, or -inf + inf
        total = math.inf
    return math.isfinite(total) or bool(torch.isfinite(t).all())


def vector_norm(v: torch.Tensor) -> float:
    """||v||, rescaled by max|v| where the sum of squares overflows (past 1e154 in float64,
    1e19 in float32) while every entry is finite: an inf norm passes any test against it,
    and a record's step_norm said inf for a finite step; or underflows (below 1e-19 in
    float32): a nonzero vector's norm of 0 divided a trust-region boundary step by zero."""
    norm = torch.linalg.vector_norm(v).item()
    if norm == math.inf or norm == 0.0:
        top = torch.linalg.vector_norm(v, math.inf).item()
        if 0.0 < top < math.inf:
            return top * torch.linalg.vector_norm(v / top).item()
    return norm


def sufficient_decrease(
    trial: float, loss: float, alpha: float, slope: float, armijo: float
) -> bool:
    """Armijo's test of a trial loss at step length alpha along a direction of slope g.d:
    trial <= loss + armijo alpha slope (finite), or a trial that overflowed to -inf (the
    loss is unbounded below along d: taken, the run then stops NON_FINITE there, on every
    backend alike, rather than backtracking until the search fails)."""
    if trial == -math.inf:
        return True
    return math.isfinite(trial) and trial <= loss + armijo * alpha * slope


def below_rounding(
    trial: float,
    loss: float,
    alpha: float,
    slope: float,
    dtype: torch.dtype,
    floor: float = 0.0,
) -> bool:
    """Whether the loss cannot judge a trial: the predicted decrease -alpha slope and the
    change |trial - loss| are both within loss_rounding(loss, dtype, floor) (by default
    relative to the loss: a sum near 0, such as a least-squares loss at its fit, is computed
    to its own precision)."""
    noise = loss_rounding(loss, dtype, floor)
    return -alpha * slope <= noise and abs(trial - loss) <= noise


def loss_rounding(loss: float, dtype: torch.dtype, floor: float = 0.0) -> float:
    """ROUNDING_ULPS eps(dtype) max(|loss|, floor): changes of the loss below it are rounding
    (`floor` 1 makes it absolute near 0; the trust region's gain-ratio test passes
    hessian_free.rounding_scale)."""
    return ROUNDING_ULPS * torch.finfo(dtype).eps * max(abs(loss), floor)


@dataclass(frozen=True)
class SolveResult:
    """A Newton direction and how it was found (damped: lambda raised above the request)."""

    direction: torch.Tensor
    damping: float
    attempts: int
    negative_eigenvalues: int = -1
    damped: bool = False


def symmetrise(h: torch.Tensor) -> torch.Tensor:
    """(H + H^T) / 2: autograd Hessians are symmetric only to rounding."""
    return (h + h.transpose(-1, -2)) * 0.5


def rounding_factor(n: int, rows: int = 0) -> float:
    """max(n, log2(rows)): how many eps max|lambda| an eigenvalue of an n x n matrix whose
    entries are sums over `rows` data rows may be off by rounding (the eigensolver's n; the
    sums' bound under pairwise or blocked summation, log2(rows): a float32 linear-mlp
    Hessian over 20,000 rows has eigenvalues of -1.3e-6 x its scale, 11 eps, where the
    exact ones are 0). Not sqrt(rows), which at 250,000 rows hid a real saddle's -2e-5."""
    return max(float(n), math.log2(rows) if rows > 1 else 0.0)


def negative_tolerance(evals: torch.Tensor, dtype: torch.dtype, rows: int = 0) -> float:
    """rounding_factor(n, rows) * eps(dtype) * max|lambda|: eigenvalues below minus this
    count as negative.

    A matrix assembled in `dtype` is known only to about eps * max|lambda| per entry (times
    the rows' growth), so an eigenvalue smaller than this in magnitude is indistinguishable
    from 0 (a positive semi-definite Gauss-Newton matrix has many at -1e-16 x its scale).
    """
    if evals.numel() == 0:
        return 0.0
    factor = rounding_factor(evals.numel(), rows)
    return factor * torch.finfo(dtype).eps * float(evals.abs().max())


def count_negative(evals: torch.Tensor, dtype: torch.dtype, rows: int = 0) -> int:
    """Eigenvalues below -negative_tolerance(evals, dtype, rows)."""
    return int((evals < -negative_tolerance(evals, dtype, rows)).sum())


def _add_gauge(
    m: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], c: float, chunk: int
) -> int:
    """m += c (I - P) in place for the orthogonal projector `project`; the gauge's dimension,
    trace(I - P). P is applied `chunk` unit vectors at a time, never formed."""
    n = m.shape[0]
    gauge = 0.0
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=m.device)
        diagonal = (torch.arange(len(rows), device=m.device), rows)
        units = torch.zeros(len(rows), n, dtype=m.dtype, device=m.device)
        units[diagonal] = 1.0
        off = units - torch.vmap(project)(units)  # rows of I - P (symmetric)
        gauge += float(off[diagonal].double().sum())
        m[start : start + len(rows)] += c * off
    return round(gauge)


def off_gauge(
    h: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], chunk: int = 256
) -> tuple[torch.Tensor, int]:
    """(h + c (I - P), g) for symmetric `h` of an objective whose loss is invariant along the
    g = n - trace P directions the orthogonal projector `project` removes
    (Objective.project_step): c is twice h's Frobenius norm, above its spectrum, so the g
    largest eigenvalues are the gauge's (h is 0 along it) and the rest are h's off it."""
    m = symmetrise(h)
    c = 2.0 * float(torch.linalg.matrix_norm(m)) or 1.0
    return m, _add_gauge(m, project, c, chunk)


def gauge_fixed(
    h: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], chunk: int = 256
) -> torch.Tensor:
    """h + c (I - P), c = max|diag h| (1 where that is 0), for a Newton solve: h is singular
    along the gauge (the loss does not change there), which made every step's Cholesky fail
    and take the damping floor, damping the directions that matter too (float32 softmax
    regression crawled: 200 damped steps); the solve's component off the gauge is h's own."""
    m = h.clone()
    c = float(m.diagonal().abs().max()) if m.numel() else 0.0
    _add_gauge(m, project, c if c > 0 and math.isfinite(c) else 1.0, chunk)
    return m


def definite_by_a_margin(m: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether symmetric `m` is positive definite by more than rounding can explain: its
    Cholesky factors m - s I, s = 4 n eps ||h||_F, four times the n eps max|lambda(h)| below
    which an eigenvalue counts as 0 (negative_tolerance), so that Cholesky's own rounding
    cannot pass a matrix eigvalsh would call semi-definite. False is no verdict (ask eigvalsh);
    a factorisation is O(n^3 / 3) where the eigenvalues are about 9 n^3."""
    n = m.shape[0]
    shift = 4 * n * torch.finfo(m.dtype).eps * float(torch.linalg.matrix_norm(h))
    if not 0 < shift < math.inf:
        return False
    shifted = m - shift * torch.eye(n, dtype=m.dtype, device=m.device)
    return int(torch.linalg.cholesky_ex(shifted).info) == 0


def negative_eigenvalues(h: torch.Tensor, rows: int = 0) -> int:
    """count_negative of the symmetrised matrix's eigenvalues (for records)."""
    return count_negative(torch.linalg.eigvalsh(symmetrise(h)), h.dtype, rows)


def damping_floor(h: torch.Tensor) -> float:
    """The smallest lambda tried after an undamped factorisation fails.

    Scaled to the matrix (sqrt(eps) of its largest entry magnitude; 1 for a zero or
    non-finite one) so the escalation takes few attempts whatever the units of the problem:
    not max(1, .) (a singular H of scale 1e-12 was damped to a gradient step), nor the
    diagonal alone ([[1e-30, 1], [1, 1e-30]] took 40 attempts).
    """
    scale = float(h.abs().max()) if h.numel() else 0.0
    return torch.finfo(h.dtype).eps ** 0.5 * (scale if 0 < scale < math.inf else 1.0)


def pivots_above_rounding(factor: torch.Tensor, hs: torch.Tensor, lam: float) -> bool:
    """Whether every pivot L_ii^2 of the Cholesky factor of hs + lam I exceeds
    ROUNDING_ULPS eps (|H_ii| + lam): a smaller one is rounding noise (lam one ulp above
    -lambda_min(H) factors, and its solve is a step of 1e13), so the escalation goes on.
    Not n eps, the worst case, which in float32 at n = 2000 damps matrices of condition 1e6
    that factor accurately."""
    tol = ROUNDING_ULPS * torch.finfo(hs.dtype).eps
    floor = tol * (hs.diagonal().abs() + lam)
    return bool((factor.diagonal().square() > floor).all())


def damped_cholesky_solve(
    h: torch.Tensor, g: torch.Tensor, damping: float = 0.0, max_attempts: int = MAX_DAMPING_ATTEMPTS
) -> SolveResult:
    """Solve (H + lambda I) d = -g with the least lambda >= `damping` (x10 a try) that is PD
    above rounding: every pivot of the factorisation must pass `pivots_above_rounding`."""
    hs = symmetrise(h)
    lam = float(damping)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(1, max_attempts + 1):
        factor, info = torch.linalg.cholesky_ex(hs + lam * eye if lam > 0 else hs)
        if int(info) == 0 and pivots_above_rounding(factor, hs, lam):
            d = torch.cholesky_solve(-g.reshape(-1, 1), factor).reshape(-1)
            if bool(torch.isfinite(d).all()):
                return SolveResult(d, lam, attempt)
        lam = max(lam * 10.0, damping_floor(hs))
    raise FloatingPointError(
        f"the damped Cholesky solve found no positive-definite H + lambda I within "
        f"{max_attempts} attempts (last lambda {lam:.3g})"
    )


def saddle_free_direction(
    h: torch.Tensor, g: torch.Tensor, eigenvalue_floor: float, rows: int = 0
) -> SolveResult:
    """d = -|H|^-1 g with |H| = V max(|Lambda|, floor) V^T; counts H's negative eigenvalues.

    floor = eigenvalue_floor x max|lambda| (relative, so the step does not depend on the
    problem's units; eigenvalue_floor itself for H = 0).
    The count is `count_negative`'s (relative to rounding_factor eps max|lambda|). Where
    plain Newton is attracted to a saddle (it follows negative curvature uphill), the absolute-value
    Hessian turns those directions into descent directions.
    """
    evals, evecs = torch.linalg.eigh(symmetrise(h))
    n_negative = count_negative(evals, h.dtype, rows)
    largest = float(evals.abs().max()) if evals.numel() else 0.0
    floor = eigenvalue_floor * largest if largest > 0 else eigenvalue_floor
    scale = evals.abs().clamp_min(floor)
    d = -(evecs @ ((evecs.T @ g) / scale))
    return SolveResult(d, 0.0, 1, n_negative)


def classify(
    lowest: float,
    highest: float,
    relative_tolerance: float,
    absolute_tolerance: float,
) -> tuple[str, str]:
    """minimum | saddle | maximum | flat from the extreme eigenvalues, with the reason."""
    scale = max(abs(lowest), abs(highest))
    eps = max(absolute_tolerance, relative_tolerance * scale)
    span = f"lambda_min = {lowest:.6g}, lambda_max = {highest:.6g}"
    if scale <= absolute_tolerance:
        return "flat", f"every eigenvalue is within {absolute_tolerance:g} of 0 ({span})"
    if lowest > eps:
        return "minimum", f"positive definite: {span}, lambda_min > {eps:.3g}"
    if highest < -eps:
        return "maximum", f"negative definite: {span}, lambda_max < -{eps:.3g}"
    if lowest < -eps and highest > eps:
        return "saddle", f"indefinite: {span}, eigenvalues of both signs beyond {eps:.3g}"
    return "flat", (
        f"semi-definite with a zero eigenvalue ({span}, |lambda| <= {eps:.3g} counts as 0): "
        "flat along some direction, the second-order test is inconclusive"
    )
