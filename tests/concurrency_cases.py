"""The calls the concurrency tests repeat from many threads, engine and service alike.

STEP_CASES covers every method, step policy, hvp mode, curvature kind and backend (native
and autograd); SPECTRUM_CASES and DENSE_CASES the curvature analyses. `wire_problem` builds
the same kinds of problem as tests/problems.py for the service, with random data drawn from
the caller's generator (the test's `rng` fixture: fresh per test id, replayable).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from hessian_client import problems
from hessian_client.proto import problem_pb2

THREADS = 6
REPEATS = 2

_HF = {"backend": "autograd"}

# case id -> (objective name, method options)
STEP_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gradient_descent-fixed": ("mlp", {"method": "gradient_descent"}),
    "gradient_descent-line_search": (
        "mlp",
        {"method": "gradient_descent", "step_policy": "line_search"},
    ),
    "newton-fixed-autograd": ("mlp", {"method": "newton", "damping": 1.0, **_HF}),
    "newton-fixed-closed_form": ("mlp", {"method": "newton", "backend": "auto", "damping": 1.0}),
    "newton-fixed-native": ("logistic_regression", {"method": "newton", "backend": "native"}),
    "newton-line_search": (
        "mlp",
        {"method": "newton", "step_policy": "line_search", "damping": 1.0, **_HF},
    ),
    "newton-levenberg_marquardt": (
        "mlp",
        {"method": "newton", "step_policy": "levenberg_marquardt", **_HF},
    ),
    "newton-gauss_newton-autograd": (
        "mlp",
        {"method": "newton", "curvature": "gauss_newton", **_HF},
    ),
    "newton-gauss_newton-closed_form": (
        "mlp",
        {"method": "newton", "curvature": "gauss_newton", "backend": "auto"},
    ),
    "saddle_free-fixed": ("mlp", {"method": "saddle_free", **_HF}),
    "saddle_free-line_search": (
        "mlp",
        {"method": "saddle_free", "step_policy": "line_search", "backend": "auto"},
    ),
    "newton_cg-trust_region-forward_over_reverse": (
        "mlp",
        {"method": "newton_cg", "hvp_mode": "forward_over_reverse", **_HF},
    ),
    "newton_cg-trust_region-reverse_over_reverse": (
        "mlp",
        {"method": "newton_cg", "hvp_mode": "reverse_over_reverse", **_HF},
    ),
    "newton_cg-fixed-forward_over_reverse": (
        "mlp",
        {
            "method": "newton_cg",
            "step_policy": "fixed",
            "hvp_mode": "forward_over_reverse",
            "damping": 1.0,
            **_HF,
        },
    ),
    "newton_cg-line_search-reverse_over_reverse": (
        "mlp",
        {
            "method": "newton_cg",
            "step_policy": "line_search",
            "hvp_mode": "reverse_over_reverse",
            "damping": 1.0,
            **_HF,
        },
    ),
    "newton_cg-gauss_newton_curvature": (
        "mlp",
        {"method": "newton_cg", "curvature": "gauss_newton", **_HF},
    ),
    "newton_cg-native": ("logistic_regression", {"method": "newton_cg", "backend": "native"}),
    "newton_cg-autograd-logistic": (
        "logistic_regression",
        {"method": "newton_cg", "hvp_mode": "forward_over_reverse", **_HF},
    ),
    "gauss_newton_cg-trust_region": ("mlp", {"method": "gauss_newton_cg", **_HF}),
    "gauss_newton_cg-line_search": (
        "mlp",
        {"method": "gauss_newton_cg", "step_policy": "line_search", **_HF},
    ),
    "gauss_newton_cg-subsampled": (
        "mlp",
        {
            "method": "gauss_newton_cg",
            "curvature_fraction": 0.5,
            "gradient_fraction": 0.75,
            "seed": 3,
            **_HF,
        },
    ),
    "gauss_newton_cg-native": (
        "softmax_regression",
        {"method": "gauss_newton_cg", "backend": "native"},
    ),
    "gauss_newton_cg-least_squares-autograd": (
        "least_squares",
        {"method": "gauss_newton_cg", **_HF},
    ),
    "auto": ("mlp", {"method": "auto", **_HF}),
    "auto-hessian_free": (
        "mlp",
        {"method": "auto", "dense_budget_bytes": 64, "hvp_mode": "forward_over_reverse"},
    ),
}

SPECTRUM_DEFAULTS: dict[str, Any] = {
    "backend": "autograd",
    "top_k": 2,
    "bottom_k": 2,
    "block_size": 2,
    "max_lanczos_iterations": 12,
    "trace_samples": 6,
    "density_probes": 2,
    "density_steps": 6,
    "batch_size": 2,
}

# case id -> (objective name, spectrum options over SPECTRUM_DEFAULTS)
SPECTRUM_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "hessian-forward_over_reverse": ("mlp", {"hvp_mode": "forward_over_reverse"}),
    "hessian-reverse_over_reverse": ("mlp", {"hvp_mode": "reverse_over_reverse"}),
    "gauss_newton": ("mlp", {"curvature": "gauss_newton"}),
    "native": ("logistic_regression", {"backend": "native"}),
    "native-gauss_newton": (
        "softmax_regression",
        {"backend": "native", "curvature": "gauss_newton"},
    ),
    "autograd-logistic": ("logistic_regression", {}),
}

# (objective name, curvature, backend) for the dense curvature (ComputeHessian)
DENSE_CASES = [
    ("mlp", "hessian", "autograd"),
    ("mlp", "gauss_newton", "autograd"),
    ("mlp", "gauss_newton", "auto"),
    ("least_squares", "gauss_newton", "autograd"),
    ("logistic_regression", "hessian", "native"),
]


def concurrent_answers(call: Callable[[], Any]) -> tuple[list[Any], list[BaseException]]:
    """`call`'s answers (and errors) from THREADS threads x REPEATS, started at one barrier."""
    barrier = threading.Barrier(THREADS)
    answers: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait(timeout=60)
        for _ in range(REPEATS):
            try:
                got = call()
            except BaseException as exc:  # collected and reported by the caller
                with lock:
                    errors.append(exc)
                continue
            with lock:
                answers.append(got)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    return answers, errors


def assert_concurrent_equals_solo(call: Callable[[], Any]) -> None:
    """`call` alone, then from THREADS threads at once: every answer equals the solo one.

    `call` returns an exact image of its answer (bytes, or tuples of them).
    """
    solo = call()
    answers, errors = concurrent_answers(call)
    assert not errors, f"{len(errors)} concurrent calls raised, first: {errors[0]!r}"
    assert len(answers) == THREADS * REPEATS
    differing = sum(answer != solo for answer in answers)
    assert differing == 0, f"{differing} of {len(answers)} concurrent answers differ from solo"


def wire_problem(name: str, size: int = 8, *, rng: np.random.Generator) -> problem_pb2.Problem:
    """A random problem of catalogue objective `name` as a wire message (float64 data from
    `rng`)."""
    rows = 4 * size
    x = rng.standard_normal((rows, size))
    if name == "mlp":
        y = rng.standard_normal((rows, 2))
        return problems.mlp(x, y, layer_sizes=[size, 5, 2], activation="tanh")
    if name == "least_squares":
        return problems.least_squares(x, rng.standard_normal(rows), l2=0.1, fit_intercept=True)
    if name == "logistic_regression":
        return problems.logistic_regression(x, rng.integers(0, 2, rows).astype(float), l2=0.01)
    if name == "softmax_regression":
        return problems.softmax_regression(x, rng.integers(0, 4, rows), num_classes=4, l2=0.01)
    raise AssertionError(name)
