"""Concurrent engine calls give bit-for-bit the answers of the same calls made alone (D4).

Every method and step policy, every curvature product (both hvp modes, Gauss-Newton,
native and autograd backends, sub-sampled curvature and mini-batch gradients), dense
curvature, analyze_curvature and short runs go from several threads at once, started
together behind a barrier (concurrency_cases.py); each answer is compared with the solo
answer by its bytes. Forward-mode AD (torch.func.jvp) kept its level in process-global
state, so before the fix concurrent Hessian-free and Gauss-Newton calls failed ("no level
exists") or returned other numbers.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
import torch
from concurrency_cases import (
    DENSE_CASES,
    SPECTRUM_CASES,
    SPECTRUM_DEFAULTS,
    STEP_CASES,
    assert_concurrent_equals_solo,
)
from hessian_service.engine import (
    MethodOptions,
    Run,
    SpectrumOptions,
    StopCriteria,
    analyze_curvature,
    take_step,
)
from hessian_service.engine.analysis.curvature_summary import dense_curvature
from hessian_service.engine.options import HVP_MODES, METHODS, STEP_POLICIES
from native_support import require_native
from problems import random_params, random_problem

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


def needs_native(backend: str | None) -> None:
    """Skip (or fail, see native_support) a native case without the extension."""
    if backend == "native":
        require_native()


def test_step_cases_cover_every_method_policy_and_mode():
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

    def step() -> Any:
        result = take_step(objective, params, options)
        return bits((result.params, result.record, result.method))

    assert_concurrent_equals_solo(step)


@pytest.mark.parametrize("method", ["newton_cg", "gauss_newton_cg"])
def test_run_concurrent_equals_solo(method):
    objective = random_problem("mlp", size=8)
    params = random_params(objective)
    options = MethodOptions(method=method, backend="autograd", hvp_mode="forward_over_reverse")
    stopping = StopCriteria(max_iterations=3, function_tolerance=0, parameter_tolerance=0)

    def run() -> Any:
        r = Run(objective, params, options, stopping)
        records = r.run_to_end()
        return bits((r.params, records, r.stop_reason.value))

    assert_concurrent_equals_solo(run)


@pytest.mark.parametrize("case", sorted(SPECTRUM_CASES))
def test_analyze_curvature_concurrent_equals_solo(case):
    name, values = SPECTRUM_CASES[case]
    needs_native(values.get("backend"))
    objective = random_problem(name, size=6)
    params = random_params(objective)
    options = SpectrumOptions(**{**SPECTRUM_DEFAULTS, **values})
    assert_concurrent_equals_solo(lambda: bits(analyze_curvature(objective, params, options)))


@pytest.mark.parametrize("name,curvature,backend", DENSE_CASES)
def test_dense_curvature_concurrent_equals_solo(name, curvature, backend):
    needs_native(backend)
    objective = random_problem(name, size=6)
    params = random_params(objective)
    options = MethodOptions(curvature=curvature, backend=backend)
    assert_concurrent_equals_solo(lambda: bits(dense_curvature(objective, params, options)))


def test_answers_do_not_depend_on_torch_global_generator():
    """Every draw (probes, sub-samples, mini-batches) uses its own seeded generator, so
    another request reseeding or drawing from torch's default generator changes nothing."""
    objective = random_problem("mlp", size=8)
    params = random_params(objective)
    step_options = MethodOptions(**STEP_CASES["gauss_newton_cg-subsampled"][1])
    spectrum_options = SpectrumOptions(**SPECTRUM_DEFAULTS)
    answers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        step = take_step(objective, params, step_options)
        report = analyze_curvature(objective, params, spectrum_options)
        answers.append(bits((step.params, step.record, report)))
    assert answers[0] == answers[1]
