"""Concurrent RPCs through a real loopback server equal the same RPC made alone, bit for bit (D4).

NewtonStep/GradientStep for every method, step policy, hvp mode, curvature and backend,
AnalyzeCurvature and ComputeHessian, each sent from several client threads at once; the
responses' bytes (timings cleared) must equal the solo response's. Before the fix the
Hessian-free and Gauss-Newton calls got INTERNAL ("no level exists") or other numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from concurrency_cases import (
    DENSE_CASES,
    SPECTRUM_CASES,
    SPECTRUM_DEFAULTS,
    STEP_CASES,
    assert_concurrent_equals_solo,
    wire_problem,
)
from google.protobuf.message import Message
from hessian_client import tensors
from hessian_client.curvature import spectrum_options
from hessian_client.options import method_options
from hessian_client.proto import service_pb2
from native_support import require_native

TIMEOUT = 120  # generous: guards against a hang only


def exact(response: Message) -> bytes:
    """The response's deterministic bytes with its wall-clock timings cleared."""
    copy = type(response)()
    copy.CopyFrom(response)
    if isinstance(copy, service_pb2.StepResponse):
        copy.record.ClearField("iteration_seconds")
        copy.record.ClearField("cumulative_seconds")
    if isinstance(copy, service_pb2.AnalyzeCurvatureResponse):
        copy.ClearField("seconds")
    return copy.SerializeToString(deterministic=True)


def _problem(stub, name: str, size: int, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A random problem stored on the server, and random parameters for it, drawn from `rng`."""
    created = stub.CreateProblem(
        service_pb2.CreateProblemRequest(problem=wire_problem(name, size, rng=rng)),
        timeout=TIMEOUT,
    )
    params = 0.5 * rng.standard_normal(created.num_params)
    return created.problem_id, params


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_step_rpcs_concurrent_equal_solo(stub, case, rng):
    name, values = STEP_CASES[case]
    if values.get("backend") == "native":
        require_native()
    pid, params = _problem(stub, name, 8, rng)
    request = service_pb2.StepRequest(
        problem_id=pid, params=tensors.encode(params), options=method_options(**values)
    )
    rpc = stub.GradientStep if values["method"] == "gradient_descent" else stub.NewtonStep
    assert_concurrent_equals_solo(lambda: exact(rpc(request, timeout=TIMEOUT)))


@pytest.mark.parametrize("case", sorted(SPECTRUM_CASES))
def test_analyze_curvature_concurrent_equals_solo(stub, case, rng):
    name, values = SPECTRUM_CASES[case]
    options = {**SPECTRUM_DEFAULTS, **values}
    if options["backend"] == "native":
        require_native()
    pid, params = _problem(stub, name, 6, rng)
    request = service_pb2.AnalyzeCurvatureRequest(
        problem_id=pid, params=tensors.encode(params), options=spectrum_options(**options)
    )
    assert_concurrent_equals_solo(lambda: exact(stub.AnalyzeCurvature(request, timeout=TIMEOUT)))


@pytest.mark.parametrize("name,curvature,backend", DENSE_CASES)
def test_compute_hessian_concurrent_equals_solo(stub, name, curvature, backend, rng):
    if backend == "native":
        require_native()
    pid, params = _problem(stub, name, 6, rng)
    opts = method_options(curvature=curvature, backend=backend)
    request = service_pb2.ComputeHessianRequest(
        problem_id=pid,
        params=tensors.encode(params),
        curvature=opts.curvature,
        backend=opts.backend,
    )
    assert_concurrent_equals_solo(lambda: exact(stub.ComputeHessian(request, timeout=TIMEOUT)))
