"""Concurrent engine calls give bit-for-bit the answers of the same calls made alone (D4).

Every method and step policy, every curvature product (both hvp modes, Gauss-Newton,
native and autograd backends, sub-sampled curvature and mini-batch gradients), dense
curvature and analyze_curvature run from THREADS threads at once, started together behind
a barrier; each answer is compared with the solo answer by its bytes. Forward-mode AD
(torch.func.jvp) kept its level in process-global state, so before the fix concurrent
Hessian-free and Gauss-Newton calls failed ("no level exists") or returned other numbers.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hessian_service.engine import (
    MethodOptions,
    Run,
    SpectrumOptions,
    StopCriteria,
    analyze_curvature,
    take_step,
)
from hessian_service.engine.curvature_summary import dense_curvature
from native_support import require_native
from problems import random_params, random_problem

THREADS = 6
REPEATS = 2
TIMING_FIELDS = {"iteration_seconds", "cumulative_seconds", "seconds"}


def bits(value: Any) -> Any:
    """A hashable, exact (bitwise) image of an answer: tensors by bytes, floats by IEEE bits."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.numpy().tobytes())
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if dataclasses.is_dataclass(value):
        return tuple(
            (f.name, bits(getattr(value, f.name)))
            for f in dataclasses.fields(value)
            if f.name not in TIMING_FIELDS
        )
    if isinstance(value, dict):
        return tuple(sorted((k, bits(v)) for k, v in value.items() if k not in TIMING_FIELDS))
    if isinstance(value, (list, tuple)):
        return tuple(bits(v) for v in value)
    return value


def concurrent_matches_solo(call: Callable[[], Any]) -> None:
    """Run `call` alone, then from THREADS threads at once; every answer equals the solo one."""
    solo = bits(call())
    barrier = threading.Barrier(THREADS)
    answers: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait(timeout=60)
        for _ in range(REPEATS):
            try:
                got = bits(call())
            except BaseException as exc:  # collected and reported below
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
    assert not errors, f"{len(errors)} concurrent calls raised, first: {errors[0]!r}"
    assert len(answers) == THREADS * REPEATS
    differing = sum(answer != solo for answer in answers)
    assert differing == 0, f"{differing} of {len(answers)} concurrent answers differ from solo"


def needs_native(backend: str | None) -> None:
    """Skip (or fail, see native_support) a native case without the extension."""
    if backend == "native":
        require_native()


def _step_result(result: Any) -> tuple[Any, ...]:
    return result.params, result.record, result.method


# (objective, options) for take_step: every method x step policy x curvature x backend.
STEP_CASES = {
    "gradient_descent-fixed": ("mlp", {"method": "gradient_descent"}),
    "gradient_descent-line_search": (
        "mlp",
        {"method": "gradient_descent", "step_policy": "line_search"},
    ),
    "newton-fixed-autograd": ("mlp", {"method": "newton", "backend": "autograd", "damping": 1.0}),
    "newton-fixed-closed_form": ("mlp", {"method": "newton", "backend": "auto", "damping": 1.0}),
    "newton-fixed-native": ("logistic_regression", {"method": "newton", "backend": "native"}),
    "newton-line_search": (
        "mlp",
        {"method": "newton", "step_policy": "line_search", "backend": "autograd", "damping": 1.0},
    ),
    "newton-levenberg_marquardt": (
        "mlp",
        {"method": "newton", "step_policy": "levenberg_marquardt", "backend": "autograd"},
    ),
    "newton-gauss_newton-autograd": (
        "mlp",
        {"method": "newton", "curvature": "gauss_newton", "backend": "autograd"},
    ),
    "newton-gauss_newton-closed_form": (
        "mlp",
        {"method": "newton", "curvature": "gauss_newton", "backend": "auto"},
    ),
    "saddle_free-fixed": ("mlp", {"method": "saddle_free", "backend": "autograd"}),
    "saddle_free-line_search": (
        "mlp",
        {"method": "saddle_free", "step_policy": "line_search", "backend": "auto"},
    ),
    "newton_cg-trust_region-forward_over_reverse": (
        "mlp",
        {"method": "newton_cg", "hvp_mode": "forward_over_reverse", "backend": "autograd"},
    ),
    "newton_cg-trust_region-reverse_over_reverse": (
        "mlp",
        {"method": "newton_cg", "hvp_mode": "reverse_over_reverse", "backend": "autograd"},
    ),
    "newton_cg-fixed-forward_over_reverse": (
        "mlp",
        {
            "method": "newton_cg",
            "step_policy": "fixed",
            "hvp_mode": "forward_over_reverse",
            "backend": "autograd",
            "damping": 1.0,
        },
    ),
    "newton_cg-line_search-reverse_over_reverse": (
        "mlp",
        {
            "method": "newton_cg",
            "step_policy": "line_search",
            "hvp_mode": "reverse_over_reverse",
            "backend": "autograd",
            "damping": 1.0,
        },
    ),
    "newton_cg-gauss_newton_curvature": (
        "mlp",
        {"method": "newton_cg", "curvature": "gauss_newton", "backend": "autograd"},
    ),
    "newton_cg-native": ("logistic_regression", {"method": "newton_cg", "backend": "native"}),
    "newton_cg-autograd-logistic": (
        "logistic_regression",
        {"method": "newton_cg", "hvp_mode": "forward_over_reverse", "backend": "autograd"},
    ),
    "gauss_newton_cg-trust_region": ("mlp", {"method": "gauss_newton_cg", "backend": "autograd"}),
    "gauss_newton_cg-line_search": (
        "mlp",
        {"method": "gauss_newton_cg", "step_policy": "line_search", "backend": "autograd"},
    ),
    "gauss_newton_cg-subsampled": (
        "mlp",
        {
            "method": "gauss_newton_cg",
            "curvature_fraction": 0.5,
            "gradient_fraction": 0.75,
            "seed": 3,
            "backend": "autograd",
        },
    ),
    "gauss_newton_cg-native": (
        "softmax_regression",
        {"method": "gauss_newton_cg", "backend": "native"},
    ),
    "gauss_newton_cg-least_squares-autograd": (
        "least_squares",
        {"method": "gauss_newton_cg", "backend": "autograd"},
    ),
    "auto": ("mlp", {"method": "auto", "backend": "autograd"}),
    "auto-hessian_free": (
        "mlp",
        {"method": "auto", "dense_budget_bytes": 64, "hvp_mode": "forward_over_reverse"},
    ),
}


def test_step_cases_cover_every_method_policy_and_mode():
    from hessian_service.engine.options import HVP_MODES, METHODS, STEP_POLICIES

    methods = {options["method"] for _, options in STEP_CASES.values()}
    assert methods == set(METHODS)
    policies = {
        MethodOptions(**options).validated().step_policy for _, options in STEP_CASES.values()
    }
    assert policies - {None} == set(STEP_POLICIES)  # None: method auto picks it
    modes = {options.get("hvp_mode") for _, options in STEP_CASES.values()}
    assert set(HVP_MODES) <= modes


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_take_step_concurrent_equals_solo(case):
    name, values = STEP_CASES[case]
    needs_native(values.get("backend"))
    objective = random_problem(name, size=8)
    params = random_params(objective)
    options = MethodOptions(**values)
    concurrent_matches_solo(lambda: _step_result(take_step(objective, params, options)))


@pytest.mark.parametrize("method", ["newton_cg", "gauss_newton_cg"])
def test_run_concurrent_equals_solo(method):
    objective = random_problem("mlp", size=8)
    params = random_params(objective)
    options = MethodOptions(method=method, backend="autograd", hvp_mode="forward_over_reverse")
    stopping = StopCriteria(max_iterations=3, function_tolerance=0, parameter_tolerance=0)

    def run() -> tuple[Any, ...]:
        r = Run(objective, params, options, stopping)
        records = r.run_to_end()
        return r.params, records, r.stop_reason.value

    concurrent_matches_solo(run)


SPECTRUM_CASES = {
    "hessian-forward_over_reverse": ("mlp", {"hvp_mode": "forward_over_reverse"}),
    "hessian-reverse_over_reverse": ("mlp", {"hvp_mode": "reverse_over_reverse"}),
    "gauss_newton": ("mlp", {"curvature": "gauss_newton"}),
    "native": ("logistic_regression", {"backend": "native"}),
    "native-gauss_newton": (
        "softmax_regression",
        {"backend": "native", "curvature": "gauss_newton"},
    ),
    "autograd-logistic": ("logistic_regression", {"backend": "autograd"}),
}


@pytest.mark.parametrize("case", sorted(SPECTRUM_CASES))
def test_analyze_curvature_concurrent_equals_solo(case):
    name, values = SPECTRUM_CASES[case]
    needs_native(values.get("backend"))
    values = {
        "backend": "autograd",
        "top_k": 2,
        "bottom_k": 2,
        "block_size": 2,
        "max_lanczos_iterations": 12,
        "trace_samples": 6,
        "density_probes": 2,
        "density_steps": 6,
        "batch_size": 2,
        **values,
    }
    objective = random_problem(name, size=6)
    params = random_params(objective)
    options = SpectrumOptions(**values)
    concurrent_matches_solo(lambda: analyze_curvature(objective, params, options))


@pytest.mark.parametrize(
    "name,curvature,backend",
    [
        ("mlp", "hessian", "autograd"),
        ("mlp", "gauss_newton", "autograd"),
        ("mlp", "gauss_newton", "auto"),
        ("least_squares", "gauss_newton", "autograd"),
        ("logistic_regression", "hessian", "native"),
    ],
)
def test_dense_curvature_concurrent_equals_solo(name, curvature, backend):
    needs_native(backend)
    objective = random_problem(name, size=6)
    params = random_params(objective)
    options = MethodOptions(curvature=curvature, backend=backend)
    concurrent_matches_solo(lambda: dense_curvature(objective, params, options))
