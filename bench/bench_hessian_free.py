"""Hessian-free section: curvature-vector product cost, and Newton-CG against LBFGS and Adam.

Part 1 times one Hessian-vector product (forward-over-reverse, torch.func), one
Gauss-Newton-vector product and a vmap'd batch of 8 HVPs against one gradient on mlps of
about 1e4, 1e5 and 1e6 parameters. Part 2 races the engine's newton_cg and
gauss_newton_cg runs against torch.optim.LBFGS (strong Wolfe) and Adam on one mlp
regression (a student fitting a teacher network), recording loss against wall time and
against evaluations, and saves the curves as bench/hessian_free_losses.png. The native
part times the closed-form block products (backends/native/products.py) against autograd
HVPs and a gradient on logistic regression and softmax regression, end to end in
AnalyzeCurvature and Newton-CG, and the Lanczos tridiagonal eigen-solve.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import (  # noqa: E402
    QUICK,
    format_seconds,
    interleaved_medians,
    markdown_table,
    quick,
)
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective  # noqa: E402
from hessian_service.engine.analysis.spectrum import SpectrumOptions, analyze_curvature  # noqa: E402
from hessian_service.engine.backends.selector import (  # noqa: E402
    curvature_block_product,
    native_status,
)
from hessian_service.engine.curvature.autograd import loss_and_grad  # noqa: E402
from hessian_service.engine.curvature.products import ggn_product, hessian_product  # noqa: E402

TITLE = "Hessian-free Newton-CG and curvature products"
DTYPE = torch.float32
HVP_TARGET = 3.0
ROWS = 256
IN_FEATURES = 64
# [64, h, h, 1]: n = h^2 + 67 h + 1
WIDTHS = quick({"1e4": 72, "1e5": 285, "1e6": 967}, {"1e4": 72})
RACE_SECONDS = quick(10.0, 1.0)
ADAM_RATES = quick((1e-3, 3e-3, 1e-2, 3e-2), (1e-3, 1e-2))
ROUNDS = quick(15, 3)


def _plot_path() -> pathlib.Path:
    """Where the race plot goes: next to BENCHMARKS.md (`_loaded` for a loaded run); a smoke
    run writes to a temporary folder so it never replaces a committed plot."""
    name = f"hessian_free_losses{common.VARIANT}.png"
    return pathlib.Path(tempfile.mkdtemp(prefix="bench-")) / name if QUICK else HERE / name


def _mlp(width: int, rows: int = ROWS):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, IN_FEATURES, generator=gen, dtype=DTYPE)
    y = torch.randn(rows, 1, generator=gen, dtype=DTYPE)
    sizes = [IN_FEATURES, width, width, 1]
    return make_objective("mlp", {"X": x, "y": y}, {"layer_sizes": sizes})


def product_costs() -> tuple[str, dict[str, list[str]]]:
    """Median time of a gradient, an HVP (both modes, reverse-over-reverse with and without
    building its graph), a GGN product and a batched HVP per mlp size, in interleaved rounds."""
    rows, misses = [], {"forward_over_reverse": [], "reused": [], "with_graph": []}
    for label, width in WIDTHS.items():
        obj = _mlp(width)
        x = obj.init_params(torch.Generator().manual_seed(1))
        v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
        batch = torch.randn(8, obj.num_params, dtype=DTYPE)
        hvp, ggn = hessian_product(obj, x), ggn_product(obj, x)
        twice = hessian_product(obj, x, "reverse_over_reverse")
        batched = torch.func.vmap(hvp)
        t = interleaved_medians(
            {
                "grad": lambda o=obj, p=x: loss_and_grad(o, p),
                "hvp": lambda f=hvp, w=v: f(w),
                "twice": lambda f=twice, w=v: f(w),
                "twice graph": lambda o=obj, p=x: hessian_product(o, p, "reverse_over_reverse"),
                "ggn": lambda f=ggn, w=v: f(w),
                "vmap 8": lambda f=batched, b=batch: f(b),
            },
            rounds=quick(7 if obj.num_params < 500_000 else 5, 3),
            warmup=1,
        )
        ratios = {
            "forward_over_reverse": t["hvp"] / t["grad"],
            "reused": t["twice"] / t["grad"],
            "with_graph": (t["twice graph"] + t["twice"]) / t["grad"],
        }
        for mode, ratio in ratios.items():
            if ratio > HVP_TARGET:
                misses[mode].append(f"n = {obj.num_params:,}: {ratio:.2f}x")
        rows.append(
            [
                f"{obj.num_params:,} ({label})",
                format_seconds(t["grad"]),
                format_seconds(t["hvp"]),
                f"**{ratios['forward_over_reverse']:.2f}x**",
                f"{ratios['reused']:.2f}x",
                f"{t['twice graph'] / t['grad']:.2f}x",
                f"{ratios['with_graph']:.2f}x",
                f"{t['ggn'] / t['grad']:.2f}x",
                f"{t['vmap 8'] / 8 / t['grad']:.2f}x",
            ]
        )
    header = [
        "n (mlp)",
        "gradient",
        "HVP",
        "HVP / grad",
        "rev-over-rev HVP / grad (graph reused)",
        "rev-over-rev graph build / grad",
        "rev-over-rev one HVP with its graph / grad",
        "GGN-vp / grad",
        "vmap 8 HVP / grad",
    ]
    return markdown_table(header, rows), misses


def _native_problems():
    """logistic_regression d = 800, N = 2000 (planted model) and softmax on sklearn digits."""
    from sklearn.datasets import load_digits

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 800, generator=gen, dtype=torch.float64) / 800**0.5
    truth = torch.randn(800, generator=gen, dtype=torch.float64)
    y = (torch.rand(2000, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ truth)).double()
    logistic = make_objective("logistic_regression", {"X": x, "y": y}, {"l2": 1e-3})
    digits = load_digits()
    softmax = make_objective(
        "softmax_regression",
        {
            "X": torch.tensor(digits.data / 16.0, dtype=torch.float64),
            "labels": torch.tensor(digits.target, dtype=torch.int64),
        },
        {"num_classes": 10, "l2": 1e-3},
    )
    return {"logistic d=800 N=2000": logistic, "softmax digits (1797 x 64, 10)": softmax}


def _interleaved_medians(fns: dict, rounds: int = ROUNDS, min_time: float = 0.01) -> dict:
    """Median per-call seconds of each fn, in interleaved rounds after two warm-up calls."""
    return interleaved_medians(fns, rounds=rounds, min_time=min_time, warmup=2)


def native_product_costs() -> tuple[str, str, dict[str, float]]:
    """Native block products B V (k = 1, 16) against autograd HVPs and one gradient (float64)."""
    rows, single = [], {}
    for label, obj in _native_problems().items():
        gen = torch.Generator().manual_seed(1)
        x = 0.1 * torch.randn(obj.num_params, generator=gen, dtype=torch.float64)
        native, which = curvature_block_product(obj, x, "native")
        if which != "native":
            return "", f"native products unavailable ({which} served); no native rows", {}
        twice = hessian_product(obj, x, "reverse_over_reverse")
        fwd = torch.func.vmap(hessian_product(obj, x), in_dims=1, out_dims=1)
        blocks = {
            k: torch.randn(obj.num_params, k, generator=gen, dtype=torch.float64) for k in (1, 16)
        }
        fns = {
            "grad": lambda o=obj, p=x: loss_and_grad(o, p),
            "setup native": lambda o=obj, p=x: curvature_block_product(o, p, "native"),
            "setup twice": lambda o=obj, p=x: hessian_product(o, p, "reverse_over_reverse"),
        }
        for k, v in blocks.items():
            fns[f"native {k}"] = lambda f=native, b=v: f(b)
            fns[f"twice {k}"] = lambda f=twice, b=v: [f(c) for c in b.unbind(1)]
            fns[f"fwd {k}"] = lambda f=fwd, b=v: f(b)
        t = _interleaved_medians(fns)
        single[label] = t["native 1"]
        for k in blocks:
            rows.append(
                [
                    f"{label}, n = {obj.num_params:,}",
                    str(k),
                    format_seconds(t["grad"]),
                    format_seconds(t[f"twice {k}"]),
                    format_seconds(t[f"fwd {k}"]),
                    format_seconds(t[f"native {k}"]),
                    f"**{t[f'native {k}'] / k / t['grad']:.2f}x**",
                    f"{t[f'twice {k}'] / t[f'native {k}']:.1f}x",
                    f"{format_seconds(t['setup native'])} / {format_seconds(t['setup twice'])}",
                ]
            )
    header = [
        "problem",
        "k",
        "gradient",
        "autograd rev-over-rev (k products)",
        "autograd fwd-over-rev vmap",
        "native block B V",
        "native per vector / grad",
        "native speed-up vs rev-over-rev",
        "per-point setup native / rev-over-rev",
    ]
    return markdown_table(header, rows), "", single


def end_to_end_costs() -> str:
    """AnalyzeCurvature and 5 Newton-CG steps with native against autograd products."""
    available, reason = native_status()
    if not available:
        return f"Missed: no native extension ({reason})."
    spectrum = {"top_k": 3, "bottom_k": 3, "eigen_tolerance": 1e-14, "max_lanczos_iterations": 100}
    stop = StopCriteria(max_iterations=5, gradient_tolerance=0.0, function_tolerance=0.0)
    rows = []
    for label, obj in _native_problems().items():
        x = torch.zeros(obj.num_params, dtype=torch.float64)
        fns = {
            f"spectrum {backend}": lambda o=obj, p=x, b=backend: analyze_curvature(
                o, p, SpectrumOptions(backend=b, hvp_mode="reverse_over_reverse", **spectrum)
            )
            for backend in ("native", "autograd")
        }
        for backend in ("native", "autograd"):
            opts = MethodOptions(method="newton_cg", backend=backend, cg_max_iterations=50)
            fns[f"cg {backend}"] = lambda o=obj, p=x, m=opts: Run(o, p, m, stop).run_to_end()
        t = _interleaved_medians(fns, rounds=quick(3, 1), min_time=0.0)
        for part, name in (("spectrum", "AnalyzeCurvature"), ("cg", "newton_cg, 5 steps")):
            native, auto = t[f"{part} native"], t[f"{part} autograd"]
            rows.append(
                [
                    f"{label}: {name}",
                    format_seconds(auto),
                    format_seconds(native),
                    f"**{auto / native:.1f}x**",
                ]
            )
    header = ["problem: call", "autograd (rev-over-rev)", "native", "native speed-up"]
    return markdown_table(header, rows)


def tridiagonal_costs() -> tuple[str, dict[str, float]]:
    """The Lanczos tridiagonal eigen-solve (m x m) by torch.linalg.eigh and by LAPACK stemr;
    the table and the m = 100 times."""
    from scipy.linalg import eigh_tridiagonal

    rows = []
    for m in (10, 30, 100):
        gen = torch.Generator().manual_seed(m)
        alphas = torch.randn(m, generator=gen, dtype=torch.float64)
        betas = torch.rand(m - 1, generator=gen, dtype=torch.float64)

        def dense(a=alphas, b=betas):
            t = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
            return torch.linalg.eigh(t)

        a_np, b_np = alphas.numpy(), betas.numpy()
        t = _interleaved_medians(
            {"dense": dense, "stemr": lambda a=a_np, b=b_np: eigh_tridiagonal(a, b)}
        )
        t_dense, t_stemr = t["dense"], t["stemr"]
        rows.append([str(m), format_seconds(t_dense), format_seconds(t_stemr)])
    header = ["m (Krylov dimension)", "torch.linalg.eigh (dense T)", "LAPACK stemr (scipy)"]
    return markdown_table(header, rows), t


def _race_problem():
    """A student mlp [16, 96, 96, 1] fitting a teacher [16, 32, 1] on 2048 rows (+1% noise)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=gen, dtype=DTYPE)
    zeros = torch.zeros(2048, 1, dtype=DTYPE)
    teacher = make_objective("mlp", {"X": x, "y": zeros}, {"layer_sizes": [16, 32, 1]})
    w = 3 * teacher.init_params(torch.Generator().manual_seed(1))
    y = teacher.outputs(w).detach()
    y = y + 0.01 * torch.randn(y.shape, generator=gen, dtype=DTYPE)
    obj = make_objective("mlp", {"X": x, "y": y}, {"layer_sizes": [16, 96, 96, 1]})
    return obj, obj.init_params(torch.Generator().manual_seed(2))


def _engine_curve(obj, x0, **options) -> list[tuple[float, int, float]]:
    """(seconds, evaluations, loss) per record; an evaluation is a gradient, HVP or loss."""
    stop = StopCriteria(
        max_iterations=100_000,
        gradient_tolerance=0.0,
        function_tolerance=0.0,
        parameter_tolerance=0.0,
        time_limit_seconds=RACE_SECONDS,
    )
    curve, evaluations = [], 1
    for record in Run(obj, x0, MethodOptions(**options), stop):
        curve.append((record.cumulative_seconds, evaluations, record.loss))
        evaluations += 1 + record.cg_iterations + record.function_evaluations
    return curve


def _torch_curve(obj, x0, make_optimizer) -> list[tuple[float, int, float]]:
    """The same for a torch.optim optimiser: one point per closure call (a gradient evaluation).

    The loss logged is the one the closure computed anyway (for LBFGS that includes its line
    search trials), so logging costs the optimiser no extra evaluation.
    """
    x = x0.clone().requires_grad_(True)
    optimizer = make_optimizer([x])
    curve: list[tuple[float, int, float]] = []
    started = time.perf_counter()

    def closure():
        optimizer.zero_grad()
        loss = obj.loss(x)
        loss.backward()
        curve.append((time.perf_counter() - started, len(curve) + 1, float(loss)))
        return loss

    while time.perf_counter() - started < RACE_SECONDS:
        optimizer.step(closure)
    return curve


def race() -> tuple[str, dict[str, list[tuple[float, int, float]]], str]:
    """Every optimiser for RACE_SECONDS on the same problem and start."""
    obj, x0 = _race_problem()
    curves = {
        "newton_cg (lambda0 = 1)": _engine_curve(
            obj, x0, method="newton_cg", damping=1.0, hvp_mode="forward_over_reverse"
        ),
        "newton_cg, reverse-over-reverse HVP": _engine_curve(
            obj, x0, method="newton_cg", damping=1.0, hvp_mode="reverse_over_reverse"
        ),
        "gauss_newton_cg (lambda0 = 1)": _engine_curve(
            obj, x0, method="gauss_newton_cg", damping=1.0
        ),
        "gauss_newton_cg, 25% curvature rows": _engine_curve(
            obj, x0, method="gauss_newton_cg", damping=1.0, curvature_fraction=0.25
        ),
        "LBFGS (strong Wolfe, m = 20)": _torch_curve(
            obj,
            x0,
            lambda p: torch.optim.LBFGS(
                p, lr=1, history_size=20, max_iter=20, line_search_fn="strong_wolfe"
            ),
        ),
    }
    adam = {
        lr: _torch_curve(obj, x0, lambda p, r=lr: torch.optim.Adam(p, lr=r)) for lr in ADAM_RATES
    }
    best_lr = min(adam, key=lambda r: _best(adam[r]))
    curves[f"Adam (lr = {best_lr:g}, best of {list(ADAM_RATES)})"] = adam[best_lr]
    return f"{obj.num_params:,} parameters, 2048 rows", curves, f"{best_lr:g}"


def _best(curve) -> float:
    return min(loss for _, _, loss in curve)


def _first_reaching(curve, target: float) -> tuple[float, int] | None:
    for seconds, evaluations, loss in curve:
        if loss <= target:
            return seconds, evaluations
    return None


def race_table(curves) -> str:
    """Best loss, and time and evaluations to reach the worst best loss (every one gets there)."""
    target = 1.0001 * max(_best(c) for c in curves.values())
    reached = {name: _first_reaching(c, target) for name, c in curves.items()}
    fastest = min(r[0] for r in reached.values() if r)
    fewest = min(r[1] for r in reached.values() if r)
    rows = []
    for name, curve in curves.items():
        hit = reached[name]
        rows.append(
            [
                name,
                f"{_best(curve):.4g}",
                str(curve[-1][1]),
                f"{hit[0]:.2f} s ({hit[0] / fastest:.1f}x)" if hit else "not reached",
                f"{hit[1]} ({hit[1] / fewest:.1f}x)" if hit else "not reached",
            ]
        )
    header = [
        f"optimiser ({RACE_SECONDS:g} s each)",
        "best loss",
        "evaluations",
        f"time to loss {target:.4g}",
        "evaluations to it",
    ]
    return markdown_table(header, rows)


def plot(curves, problem: str, path: pathlib.Path) -> None:
    """Loss against wall time and against evaluations, log scale, into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        seconds, evaluations, losses = zip(*curve, strict=True)
        axes[0].plot(seconds, losses, label=name)
        axes[1].plot(evaluations, losses, label=name)
    axes[0].set_xlabel("wall time (s, one thread)")
    axes[1].set_xlabel("evaluations (gradients + Hessian-vector products + losses)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("training loss (mse)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"mlp regression, {problem}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _eigh_share(eigh_100: float, product: float) -> float:
    """Upper bound of the eigen-solves' share of a 100-product Lanczos call: its about 17
    convergence checks (every max(5, m / 8) products) each at the m = 100 cost."""
    solves = 17 * eigh_100
    return solves / (solves + 100 * product)


def run() -> str:
    """The markdown body of the section."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        costs, misses = product_costs()
        native_costs, native_miss, single = native_product_costs()
        tridiagonal, eigh_100 = tridiagonal_costs()
        end_to_end = end_to_end_costs()
        problem, curves, _ = race()
        plot_path = _plot_path()
        plot(curves, problem, plot_path)
        table = race_table(curves)
        leader = min(curves, key=lambda name: _best(curves[name]))
        verdict = f"Lowest loss in {RACE_SECONDS:g} s: {leader} ({_best(curves[leader]):.3g})."
    finally:
        torch.set_num_threads(threads)

    def hvp_verdict(mode: str, what: str) -> str:
        missed = misses[mode]
        if missed:
            return f"- {what}: **MISSED** ({'; '.join(missed)})."
        return f"- {what}: met at every size."

    verdicts = "\n".join(
        [
            f"Targets (computed in this run): an HVP within {HVP_TARGET:g}x a gradient.",
            hvp_verdict("forward_over_reverse", "forward-over-reverse"),
            hvp_verdict("reused", "reverse-over-reverse, graph reused (later products of a step)"),
            hvp_verdict(
                "with_graph",
                "reverse-over-reverse, one product with its graph build (a step's first)",
            ),
        ]
    )
    why = (
        "\n\nWhy forward-over-reverse misses where it does: each product re-runs the forward "
        "and backward passes under two torch.func transforms, whose per-op overhead dominates "
        "small layers; reverse-over-reverse builds the gradient's graph once per Newton step "
        "and then pays one backward per product."
        if misses["forward_over_reverse"]
        else ""
    )
    if single:
        name, product = min(single.items(), key=lambda kv: kv[1])
        share = _eigh_share(eigh_100["dense"], product)
        eigen_text = (
            f"At m = 100 the dense solve takes {format_seconds(eigh_100['dense'])}, "
            f"{eigh_100['dense'] / product:.1f}x one native product on {name} "
            f"({format_seconds(product)}, the cheapest above); Lanczos runs it only at its "
            "convergence checks (every max(5, m / 8) products, about 17 in 100 products), so "
            f"in a 100-product call the solves are at most {share:.1%} of the work (each "
            f"priced at m = 100). LAPACK's tridiagonal solver (stemr: "
            f"{format_seconds(eigh_100['stemr'])} at m = 100, what a C++ version would call; "
            "and block Lanczos' projected matrix is banded, not tridiagonal) would save "
            f"{1 - eigh_100['stemr'] / eigh_100['dense']:.0%} of that."
        )
    else:
        eigen_text = "No native product was timed, so no share of the eigen-solve is given."
    plot_name = plot_path.name
    return f"""
All timings single-threaded (`torch.set_num_threads(1)`: with two threads on a shared 2-core
machine every parallel region waits on the busier core), float32, medians of interleaved
rounds: every column of a row timed once per round, the order reversed every other round.

### Curvature-vector products against one gradient (mlp [64, h, h, 1], {ROWS} rows)

{costs}

HVP: forward-over-reverse (`torch.func.jvp` of `torch.func.grad`), one product per call, no
graph reuse (`hvp_mode="forward_over_reverse"`). rev-over-rev: `hvp_mode="reverse_over_reverse"`
(the engine's default): the gradient's graph built once per Newton step (one create_graph
gradient: the "graph build" column) and one backward through it per product; "one HVP with its
graph" counts both, the cost of a step's first product. GGN-vp: jvp of the outputs,
output-space Hessian product, vjp. vmap 8: eight HVPs in one `torch.func.vmap` call, time per
vector (what the spectrum analysis uses).

{verdicts}{why}

### Native block products against autograd (closed-form objectives, float64)

{native_costs}{native_miss}

Native: `curvature_block_product(..., "native")` (csrc/products.cpp), one call for the whole
(n, k) block, two GEMMs with X; the per-point weights p (1 - p) or softmax probabilities are
taken once when the product is built (setup column, against the create_graph gradient that
reverse-over-reverse needs once per point). rev-over-rev: k backward passes through the
retained graph; fwd-over-rev vmap: one `torch.func.vmap` over the k columns (what the spectrum
uses for probe blocks). Newton-CG and AnalyzeCurvature use the native products under backend
auto/native for mse, quadratic, least_squares, logistic_regression and softmax_regression.
A block of k reads X twice for all k columns (GEMMs), so its cost per vector falls with k; the
single product (k = 1) is two GEMVs, like reverse-over-reverse's backward.

End to end (AnalyzeCurvature: 3 + 3 extreme eigenvalues with block Lanczos, Hutchinson and
Hutch++ on 30 products each, SLQ 4 x 30; Newton-CG: 5 trust-region steps from 0, at most 50
CG iterations each):

{end_to_end}

Lanczos' tridiagonal eigen-solve, per convergence check (float64):

{tridiagonal}

{eigen_text}

### Newton-CG against LBFGS and Adam on one mlp regression ({problem})

{table}

![loss against time and evaluations]({plot_name})

The target is the worst of the best losses, so every optimiser reaches it; ratios are to the
fastest (and to the fewest evaluations). The optimisers ran one after another (each for
{RACE_SECONDS:g} s), not interleaved: the load line above says whether the machine stayed
steady meanwhile. Curves: the engine runs' accepted iterates (rejected trust-region trials
cost evaluations but add no point); torch.optim's every closure evaluation (for LBFGS its
line-search trials too; Adam's spikes are its own). Evaluations count every gradient,
Hessian-vector product and loss-only trial as one; an HVP costs the multiple of a gradient
in the first table. Newton-CG runs are the
engine's `Run` (Steihaug trust region, Eisenstat-Walker forcing, Martens damping from
lambda0 = 1, at most 100 CG iterations), with curvature products on all rows or a seeded 25% of
them; `newton_cg (lambda0 = 1)` uses forward-over-reverse Hessian products, the row below it
reverse-over-reverse; LBFGS and Adam are torch.optim on the same loss function and start.
Adam's learning rate was picked from the list by its best loss, the others ran with their
defaults or the stated settings, untuned. {verdict}
"""
