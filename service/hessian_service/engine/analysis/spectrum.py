"""Matrix-free curvature analysis: extreme eigenvalues, trace, spectral density, a verdict.

Everything runs on curvature-vector products (chosen by backends/selector.py), never a dense
matrix:
block Lanczos with full reorthogonalisation and deflation for the top-k and bottom-k
eigenvalues with their multiplicities (block_lanczos.py; stopping when the Ritz residual
norms meet the tolerance), Hutchinson's and
Hutch++'s trace estimators with a normal-approximation confidence interval, and stochastic
Lanczos quadrature (Ubaru, Chen & Saad 2017) for the spectral density, as PyHessian does.
Probes are Rademacher vectors from a seeded generator, so a report is reproducible;
batches of probes go through one torch.func.vmap'd product. The verdict answers the
seed's question: is this point a minimum, a saddle, a maximum, or flat?

Memory (SpectrumOptions.check_cost): for the extremes the Krylov basis (its dimension in
n-vectors, the projected matrix and its eigenvectors) and BLOCK_VECTORS n-vectors a block
column, the block being at most the Krylov dimension; TRACE_VECTORS n-vectors a trace sample;
min(batch_size, density_probes) x (density_steps + 1 + DENSITY_VECTORS) n-vectors for the
density. The density's smoothing works through the grid in pieces of at most KERNEL_VALUES
values.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .. import cancel
from ..backends.selector import curvature_products
from ..cancel import CancelToken, scope
from ..curvature.autograd import loss_and_grad
from ..curvature.products import BlockProduct, Product
from ..errors import ResourceLimitError, UnknownNameError, ValidationError
from ..linalg import classify
from ..objectives.base import Objective
from ..options import BACKENDS, HVP_MODES, requested_backend
from ..validation import decomposable, require_int, require_no_extra
from .block_lanczos import block_lanczos_extremes

CURVATURES = ("hessian", "gauss_newton")
VERDICTS = ("minimum", "saddle", "maximum", "flat")
# (n, b) arrays block Lanczos holds at once a block of b: the start block, the block, its
# product and the temporaries of reorthogonalising and orthonormalising it (6.5 measured)
BLOCK_VECTORS = 8
# n-vectors a trace sample holds at once: Hutchinson's probes, their products in batches, the
# batches' concatenation and a product of two of them (3 to 4 measured; Hutch++ holds fewer)
TRACE_VECTORS = 4
# n-vectors a density probe holds besides its Lanczos basis: the probe, its product and the
# product's own temporaries under vmap, the recurrence's working vectors, and its share of
# the dozen a small batch holds in common (measured on Rosenbrock, n = 2e5 and 4e5, peak
# resident memory: 6 a probe with forward-over-reverse products and 7.75 with
# reverse-over-reverse, plus 11 a batch)
DENSITY_VECTORS = 12
KERNEL_VALUES = 2**20  # grid x Ritz value entries of the density's smoothing at a time


def _real(
    name: str, value: Any, low: float, high: float, *, open_high: bool = True, zero: bool = False
) -> float:
    """A finite real in (low, high), or [low, high) with `zero` (a tolerance of 0: exact)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(name, "a finite real number", repr(value))
    above = low <= value if zero else low < value
    if not (above and (value < high if open_high else value <= high)):
        opening, closing = "[" if zero else "(", ")" if open_high else "]"
        raise ValidationError(name, f"a number in {opening}{low}, {high}{closing}", repr(value))
    return float(value)


@dataclass(frozen=True)
class SpectrumOptions:
    """What `analyze_curvature` computes and how hard it tries.

    top_k / bottom_k: how many of the largest / smallest eigenvalues to report (>= 1), each
    repeated as often as its multiplicity when that is at most block_size (the Lanczos block:
    block_size vectors per step, at most the Krylov dimension min(max_lanczos_iterations, n);
    1 is plain Lanczos, which reports a repeated eigenvalue once).
    max_lanczos_iterations: the Krylov dimension cap for them (= their curvature-vector
    products); eigen_tolerance: the Ritz residual norm, relative to the largest |eigenvalue|,
    at which they count as converged.
    trace_samples: the product budget of each trace estimator (0: no trace); confidence:
    the two-sided level of its interval. density_probes x density_steps: SLQ (0 probes: no
    density), smoothed by a Gaussian of width density_sigma (None: 1% of the spectral
    range) on grid_points points. batch_size: probes per vmap'd product. verdict tolerances:
    an eigenvalue counts as zero when |lambda| <= max(absolute_tolerance, relative_tolerance
    x max|lambda|); a point is stationary when max|g| <= gradient_tolerance (a tolerance of 0
    is exact; eigen_tolerance 0 runs Lanczos to its cap). hvp_mode: the
    Hessian product for the Lanczos blocks (reverse_over_reverse, cheaper per product on small
    models, runs column by column; forward_over_reverse, a torch.func vjp of the gradient, is
    vmap'd over the block); batched probes always use the vmap'd forward_over_reverse
    product. backend: auto | native |
    autograd (None: $HESSIAN_BACKEND, else auto); auto and native use the closed-form native
    block products where backends/native/products.py covers the objective (hvp_mode is then unused).
    """

    top_k: int = 1
    bottom_k: int = 1
    block_size: int = 4
    curvature: str = "hessian"
    max_lanczos_iterations: int = 100
    eigen_tolerance: float = 1e-10
    trace_samples: int = 30
    confidence: float = 0.95
    density_probes: int = 4
    density_steps: int = 30
    density_sigma: float | None = None
    grid_points: int = 200
    batch_size: int = 16
    relative_tolerance: float = 1e-6
    absolute_tolerance: float = 1e-10
    gradient_tolerance: float = 1e-6
    seed: int = 0
    hvp_mode: str = "forward_over_reverse"
    backend: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any], field_prefix: str = "options") -> SpectrumOptions:
        """Build from a dict, rejecting unknown keys by name."""
        require_no_extra(values, {f.name for f in fields(cls)}, field_prefix)
        return cls(**values).validated(field_prefix)

    def validated(self, field_prefix: str = "options") -> SpectrumOptions:
        """Check every field, naming the one that is wrong."""
        p = field_prefix
        require_int(f"{p}.top_k", self.top_k, 1)
        require_int(f"{p}.bottom_k", self.bottom_k, 1)
        require_int(f"{p}.block_size", self.block_size, 1)
        if self.curvature not in CURVATURES:
            raise UnknownNameError(f"{p}.curvature", self.curvature, list(CURVATURES))
        require_int(f"{p}.max_lanczos_iterations", self.max_lanczos_iterations, 2)
        _real(f"{p}.eigen_tolerance", self.eigen_tolerance, 0.0, 1.0, zero=True)
        samples = require_int(f"{p}.trace_samples", self.trace_samples, 0)
        if 0 < samples < 3:
            raise ValidationError(f"{p}.trace_samples", "0 or an integer >= 3", repr(samples))
        _real(f"{p}.confidence", self.confidence, 0.0, 1.0)
        require_int(f"{p}.density_probes", self.density_probes, 0)
        require_int(f"{p}.density_steps", self.density_steps, 2)
        if self.density_sigma is not None:
            _real(f"{p}.density_sigma", self.density_sigma, 0.0, math.inf)
        require_int(f"{p}.grid_points", self.grid_points, 2)
        require_int(f"{p}.batch_size", self.batch_size, 1)
        _real(f"{p}.relative_tolerance", self.relative_tolerance, 0.0, 1.0, zero=True)
        _real(f"{p}.absolute_tolerance", self.absolute_tolerance, 0.0, math.inf, zero=True)
        _real(f"{p}.gradient_tolerance", self.gradient_tolerance, 0.0, math.inf, zero=True)
        require_int(f"{p}.seed", self.seed, 0)
        if self.hvp_mode not in HVP_MODES:
            raise UnknownNameError(f"{p}.hvp_mode", self.hvp_mode, list(HVP_MODES))
        if self.backend is not None and self.backend not in BACKENDS:
            raise UnknownNameError(f"{p}.backend", self.backend, list(BACKENDS))
        return self

    def lanczos_block(self, n: int) -> int:
        """The block block Lanczos uses on `n` parameters: block_size, at most the Krylov
        dimension min(max_lanczos_iterations, n) (a wider start block adds nothing)."""
        return min(self.block_size, self.max_lanczos_iterations, n)

    def check_cost(
        self,
        n: int,
        itemsize: int,
        budget_bytes: int,
        max_products: int,
        field_prefix: str = "options",
    ) -> None:
        """Refuse, before any work, an analysis of `n` parameters that would take more than
        `max_products` curvature-vector products or whose working memory (`itemsize` bytes a
        value; float64 for the small projected matrices) needs more than `budget_bytes`; the
        error names the option that drives the most."""
        p = field_prefix
        # the density's products are probes x steps: the larger factor is named
        density = "density_steps" if self.density_steps > self.density_probes else "density_probes"
        products = {
            f"{p}.max_lanczos_iterations": min(self.max_lanczos_iterations, n),
            f"{p}.trace_samples": 2 * self.trace_samples,
            f"{p}.{density}": self.density_probes * self.density_steps,
        }
        if sum(products.values()) > max_products:
            field = max(products.items(), key=lambda kv: kv[1])[0]
            raise ResourceLimitError(
                field,
                f"about {sum(products.values())} curvature-vector products requested, over the "
                f"server's cap of {max_products} per call",
            )
        # the parts of each phase live together, the phases one after another
        m, b = min(self.max_lanczos_iterations, n), self.lanczos_block(n)
        trace = TRACE_VECTORS * self.trace_samples
        steps = self.density_steps + 1
        # a batch holds batch_size probes, or all of them when there are fewer
        batch = min(self.batch_size, self.density_probes)
        batch_field = "batch_size" if batch == self.batch_size else "density_probes"
        density = batch * (steps + DENSITY_VECTORS)
        wider = batch_field if batch > steps + DENSITY_VECTORS else "density_steps"
        phases = [
            (
                f"block Lanczos's basis of {m} vectors ({p}.max_lanczos_iterations) with its "
                f"projected matrix, and the working set of its block of {b} ({p}.block_size, "
                "at most that dimension)",
                {
                    f"{p}.max_lanczos_iterations": m * n * itemsize + 2 * m * m * 8,
                    f"{p}.block_size": BLOCK_VECTORS * b * n * itemsize + 4 * b * b * 8,
                },
            ),
            (
                f"{trace} working vectors for the trace ({TRACE_VECTORS} a sample of "
                f"{p}.trace_samples)",
                {f"{p}.trace_samples": trace * n * itemsize},
            ),
            (
                f"{density} working vectors for the density ({batch} probes a batch: "
                f"{p}.batch_size = {self.batch_size}, {p}.density_probes = "
                f"{self.density_probes}; each with {p}.density_steps + 1 = {steps} Lanczos "
                f"vectors and {DENSITY_VECTORS} working ones)",
                {f"{p}.{wider}": density * n * itemsize},
            ),
        ]
        what, parts = max(phases, key=lambda phase: sum(phase[1].values()))
        need = sum(parts.values())
        if need > budget_bytes:
            field = max(parts.items(), key=lambda kv: kv[1])[0]
            raise ResourceLimitError(
                field,
                f"{what} of {n} parameters need {need} bytes, over the server's memory budget "
                f"of {budget_bytes} (dense_budget_bytes); ask for less",
            )


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate: value +- half_width at `confidence` (normal approximation)."""

    estimate: float
    half_width: float
    confidence: float
    products: int


@dataclass(frozen=True)
class SpectralDensity:
    """SLQ density of eigenvalues (integrates to 1) on `grid`, and SLQ's own trace estimate."""

    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    probes: int
    steps: int
    trace: float


@dataclass(frozen=True)
class CurvatureReport:
    """The curvature at one point, from `products` curvature-vector products.

    top_eigenvalues descend, bottom_eigenvalues ascend (a repeated eigenvalue appears once per
    multiplicity, up to the block size); eigen_residuals bound each one's error (Ritz residual
    norms, top then bottom); lanczos_iterations counts block steps. verdict is one of
    VERDICTS, or "" (undetermined) when Lanczos did not converge and its Ritz values, which
    lie inside the spectrum, do not prove a saddle; verdict_reason says why in words.
    backend: which products ran (native | autograd).
    """

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
    trace_hutchinson: TraceEstimate | None
    trace_hutchpp: TraceEstimate | None
    density: SpectralDensity | None
    products: int
    products_by_part: dict[str, int]
    verdict: str
    verdict_reason: str
    seconds: float
    backend: str = "autograd"

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (tensors become lists)."""
        out = asdict(self)
        if self.density is not None:
            out["density"]["grid"] = self.density.grid.tolist()
            out["density"]["density"] = self.density.density.tolist()
        return out


class _Counter:
    """Wraps a product, counting vectors, with a vmap'd batched form.

    `block_product` (default: the vmap'd `product` over columns) serves Lanczos blocks; it may
    be a cheaper non-vmap-able product (reverse over reverse) of the same matrix. `batched`
    (default: the vmap'd `product`) maps a (b, n) batch of rows to their products.
    """

    def __init__(
        self,
        product: Product,
        batch_size: int,
        block_product: BlockProduct | None = None,
        batched: BlockProduct | None = None,
    ) -> None:
        self.batched = batched or torch.func.vmap(product)
        self.block_product = block_product or torch.func.vmap(product, in_dims=1, out_dims=1)
        self.batch_size = batch_size
        self.count = 0

    def block(self, v: torch.Tensor) -> torch.Tensor:
        """The product of each column of the (n, b) block `v`."""
        cancel.check(f"after {self.count} curvature-vector products")
        self.count += v.shape[1]
        return self.block_product(v)

    def many(self, vs: torch.Tensor) -> torch.Tensor:
        """Products of the rows of `vs`, `batch_size` rows per vmap'd call."""
        parts = []
        for chunk in vs.split(self.batch_size):
            cancel.check(f"after {self.count} curvature-vector products")
            parts.append(self.batched(chunk))
            self.count += chunk.shape[0]
        return torch.cat(parts) if parts else vs.clone()


def _rademacher(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    signs = torch.randint(0, 2, shape, generator=gen).to(dtype=like.dtype, device=like.device)
    return 2 * signs - 1


def _z_value(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def _interval(samples: torch.Tensor, confidence: float) -> float:
    """Half-width of the normal-approximation interval of the mean of `samples`."""
    if samples.numel() < 2:
        return math.inf
    return _z_value(confidence) * float(samples.std(unbiased=True)) / math.sqrt(samples.numel())


def hutchinson_trace(
    counter: _Counter, n: int, samples: int, gen: torch.Generator, like: torch.Tensor, conf: float
) -> TraceEstimate:
    """Hutchinson's estimator mean(z^T B z) over Rademacher z."""
    start = counter.count
    z = _rademacher((samples, n), gen, like)
    values = (z * counter.many(z)).sum(dim=1)
    return TraceEstimate(float(values.mean()), _interval(values, conf), conf, counter.count - start)


def hutchpp_trace(
    counter: _Counter, n: int, samples: int, gen: torch.Generator, like: torch.Tensor, conf: float
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched range, Hutchinson on the rest.

    A third of the budget sketches Q = orth(B S), a third gives tr(Q^T B Q) exactly, the
    rest estimates tr((I - QQ^T) B (I - QQ^T)); the interval is that part's (given Q).
    """
    start = counter.count
    k = max(1, min(samples // 3, n))
    sketch = counter.many(_rademacher((k, n), gen, like))
    q = torch.linalg.qr(sketch.T).Q.T  # (k, n), orthonormal rows
    exact = float((q * counter.many(q)).sum())
    rest = samples - 2 * k
    g = _rademacher((rest, n), gen, like)
    g = g - (g @ q.T) @ q
    values = (g * counter.many(g)).sum(dim=1)
    estimate = exact + (float(values.mean()) if rest else 0.0)
    return TraceEstimate(estimate, _interval(values, conf), conf, counter.count - start)


def _batched_lanczos(
    counter: _Counter, starts: torch.Tensor, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Lanczos from each row of `starts` at once (vmap'd products); per probe (theta, tau).

    tau_j is the squared first component of T's j-th eigenvector: the quadrature weight.
    A probe whose Krylov space becomes invariant stops there (its later vectors are zero).
    """
    b, n = starts.shape
    steps = min(steps, n)
    q_all = starts.new_zeros((steps + 1, b, n))
    q_all[0] = starts / starts.norm(dim=1, keepdim=True)
    alphas = starts.new_zeros((steps, b), dtype=torch.float64)
    betas = starts.new_zeros((steps, b), dtype=torch.float64)
    length = torch.full((b,), steps, dtype=torch.long)
    for j in range(steps):
        w = counter.many(q_all[j])
        alpha = (q_all[j] * w).sum(dim=1)
        w = w - alpha[:, None] * q_all[j]
        if j:
            w = w - betas[j - 1].to(w.dtype)[:, None] * q_all[j - 1]
        basis = q_all[: j + 1]
        for _ in range(2):
            w = w - torch.einsum("jb,jbn->bn", torch.einsum("jbn,bn->jb", basis, w), basis)
        beta = w.norm(dim=1)
        alphas[j], betas[j] = alpha.double(), beta.double()
        scale = alphas[: j + 1].abs().max(dim=0).values + betas[: j + 1].max(dim=0).values
        done = (beta.double() <= 1e-12 * scale.clamp_min(1e-300)) & (length == steps)
        length[done] = j + 1
        alive = (length == steps).to(w.dtype)[:, None]
        q_all[j + 1] = alive * w / beta.clamp_min(1e-300)[:, None]
        if not bool((length == steps).any()):
            break
    out = []
    for i in range(b):
        m = int(length[i])
        off = betas[: m - 1, i]
        t = torch.diag(alphas[:m, i]) + torch.diag(off, 1) + torch.diag(off, -1)
        theta, vecs = torch.linalg.eigh(t.cpu())
        out.append((theta, vecs[0] ** 2))
    return out


def spectral_density(
    counter: _Counter,
    n: int,
    opts: SpectrumOptions,
    gen: torch.Generator,
    like: torch.Tensor,
    bounds: tuple[float, float],
) -> SpectralDensity:
    """SLQ: average over probes of sum_j tau_j N(t; theta_j, sigma^2) on a grid."""
    nodes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, opts.density_probes, opts.batch_size):
        count = min(opts.batch_size, opts.density_probes - start)
        probes = _rademacher((count, n), gen, like)
        nodes += _batched_lanczos(counter, probes, opts.density_steps)
    thetas = torch.cat([t for t, _ in nodes])
    lo = min(bounds[0], float(thetas.min()))
    hi = max(bounds[1], float(thetas.max()))
    width = hi - lo
    sigma = opts.density_sigma or (0.01 * width if width > 0 else 1e-3 * max(abs(hi), 1.0))
    pad = 0.05 * width + 3 * sigma
    grid = torch.linspace(lo - pad, hi + pad, opts.grid_points, dtype=torch.float64)
    # a kernel narrower than the grid's spacing falls between its points (a density of all
    # zeros): it is widened to the spacing, which `sigma` reports
    sigma = max(sigma, float(grid[1] - grid[0]))
    density = torch.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for theta, tau in nodes:
        rows = max(1, KERNEL_VALUES // theta.numel())
        for part, out in zip(grid.split(rows), density.split(rows), strict=True):
            kernel = torch.exp(-0.5 * ((part[:, None] - theta[None, :]) / sigma) ** 2)
            out += norm * (kernel * tau[None, :]).sum(dim=1)
    density /= len(nodes)
    trace = n * statistics.fmean(float((theta * tau).sum()) for theta, tau in nodes)
    return SpectralDensity(grid, density, sigma, len(nodes), opts.density_steps, trace)


def analyze_curvature(
    objective: Objective,
    params: torch.Tensor,
    options: SpectrumOptions | None = None,
    cancel: CancelToken | None = None,
) -> CurvatureReport:
    """Eigenvalue extremes, trace, spectral density and a verdict at `params`, matrix-free.

    `cancel`: checked before every batch of curvature products (raises cancel.Cancelled).
    """
    with scope(cancel), decomposable("params"):
        return _analyze(objective, params, options)


def _analyze(
    objective: Objective, params: torch.Tensor, options: SpectrumOptions | None
) -> CurvatureReport:
    started = time.perf_counter()
    opts = (options or SpectrumOptions()).validated()
    objective.require_curvature(opts.curvature)
    x = objective.check_params(params)
    n = x.numel()
    loss, grad = loss_and_grad(objective, x)
    if not (math.isfinite(float(loss)) and bool(torch.isfinite(grad).all())):
        raise ValidationError(
            "params", "a point where the loss and its gradient are finite", "non-finite values"
        )
    gmax = float(grad.abs().max()) if n else 0.0
    backend = requested_backend(opts.backend)
    chosen = curvature_products(objective, x, backend, opts.curvature)
    block = chosen.block(opts.hvp_mode)
    counter = _Counter(chosen.vector(), opts.batch_size, block, chosen.batched())
    gen = torch.Generator().manual_seed(opts.seed)
    by_part: dict[str, int] = {}

    start_block = torch.randn(n, opts.lanczos_block(n), generator=gen, dtype=torch.float64).to(x)
    top, bottom, bounds, iters, _, converged = block_lanczos_extremes(
        counter.block,
        start_block,
        opts.top_k,
        opts.bottom_k,
        opts.max_lanczos_iterations,
        opts.eigen_tolerance,
    )
    by_part["lanczos"] = counter.count
    hutch = hutchpp = None
    if opts.trace_samples:
        hutch = hutchinson_trace(counter, n, opts.trace_samples, gen, x, opts.confidence)
        hutchpp = hutchpp_trace(counter, n, opts.trace_samples, gen, x, opts.confidence)
        by_part["hutchinson"], by_part["hutchpp"] = hutch.products, hutchpp.products
    density = None
    if opts.density_probes:
        before = counter.count
        density = spectral_density(counter, n, opts, gen, x, (bottom[0], top[0]))
        by_part["density"] = counter.count - before
    verdict, reason = classify(bottom[0], top[0], opts.relative_tolerance, opts.absolute_tolerance)
    stationary = gmax <= opts.gradient_tolerance
    if not converged:
        lanczos = (
            f"block Lanczos did not converge in {iters} block steps ({by_part['lanczos']} "
            "products; Ritz values lie inside the spectrum, so the true extremes may be "
            "further out)"
        )
        # Ritz values of both signs prove eigenvalues of both; the band that counts as 0 is
        # relative to max|lambda|, which they may underestimate: a saddle must clear it at
        # each Ritz value widened by its residual bound
        widened = max(abs(bottom[0]) + bounds[len(top)], abs(top[0]) + bounds[0])
        band = max(opts.absolute_tolerance, opts.relative_tolerance * widened)
        if verdict == "saddle" and bottom[0] < -band and top[0] > band:
            reason += "; " + lanczos
        else:
            verdict, reason = "", f"undetermined: {lanczos}; the Ritz values say {reason}"
    if not stationary:
        reason += (
            f"; not a stationary point (max|g| = {gmax:.3g} > {opts.gradient_tolerance:g}): "
            "this is the local curvature, not the type of a critical point"
        )
    return CurvatureReport(
        num_params=n,
        curvature=opts.curvature,
        loss=float(loss),
        gradient_max_norm=gmax,
        stationary=stationary,
        top_eigenvalues=top,
        bottom_eigenvalues=bottom,
        eigen_residuals=bounds,
        lanczos_iterations=iters,
        eigenvalues_converged=converged,
        trace_hutchinson=hutch,
        trace_hutchpp=hutchpp,
        density=density,
        products=counter.count,
        products_by_part=by_part,
        verdict=verdict,
        verdict_reason=reason,
        seconds=time.perf_counter() - started,
        backend=chosen.label,
    )


__all__ = [
    "CurvatureReport",
    "SpectralDensity",
    "SpectrumOptions",
    "TraceEstimate",
    "analyze_curvature",
    "classify",
]
