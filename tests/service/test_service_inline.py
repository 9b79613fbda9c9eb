"""Small steps run on the server's event loop; big ones on the pool, and the loop stays free.

`--inline-step-below` lets a NewtonStep/GradientStep on a built problem below that size skip
the pool's two thread hand-offs. What must hold: the answer is the pool's, bit for bit; a
refusal from an inline handler keeps its status, field details and request id (an inline
handler cannot wait for the loop it runs on); a step over the threshold runs on an
`--rpc-threads` thread, so while it works the loop answers other calls. The engine entry
point is wrapped (not replaced) to see which thread ran it; waits are on events, with
generous bounds that only guard against hangs.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from conftest import start_server
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hessian_client import problems, tensors
from hessian_client.options import method_options
from hessian_client.proto import service_pb2, service_pb2_grpc
from hessian_service.server import ServerConfig, service

HANG_GUARD = 60  # seconds; every wait here ends long before unless the loop is blocked


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One server with the default threshold, one that never runs a step inline."""
    inline = start_server(tmp_path_factory.mktemp("inline"))
    pooled = start_server(tmp_path_factory.mktemp("pooled"), inline_step_below=0)
    yield inline, pooled
    inline.stop(grace=1.0)
    pooled.stop(grace=1.0)


@pytest.fixture
def threads_seen(monkeypatch):
    """The names of the threads that ran the engine's take_step, in call order."""
    seen: list[str] = []
    real = service.take_step

    def observed(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "take_step", observed)
    return seen


def _stub(handle) -> service_pb2_grpc.HessianServiceStub:
    return service_pb2_grpc.HessianServiceStub(grpc.insecure_channel(handle.address))


def _small_step(
    stubs: list, rng: np.random.Generator, **options: object
) -> service_pb2.StepRequest:
    """A NewtonStep request on a fresh random 6x4 mse problem (size 24^3), stored on every
    server of `stubs` (its id is its content address, the same on each)."""
    problem = problems.mse(rng.standard_normal((6, 4)))
    for stub in stubs:
        created = stub.CreateProblem(
            service_pb2.CreateProblemRequest(problem=problem), timeout=HANG_GUARD
        )
        _first_by_id(stub, created.problem_id, rng.standard_normal(24))
    return service_pb2.StepRequest(
        problem_id=created.problem_id,
        params=tensors.encode(rng.standard_normal((6, 4))),
        options=method_options(**options),
    )


def _first_by_id(stub, pid: str, params: np.ndarray) -> None:
    """A caller's first step on a problem id: its hold is read from the store (on the pool)
    and remembered, so its later small steps may run inline."""
    stub.GradientStep(
        service_pb2.StepRequest(problem_id=pid, params=tensors.encode(params)),
        timeout=HANG_GUARD,
    )


def _exact(response: service_pb2.StepResponse) -> bytes:
    """The response's bytes with its wall-clock timings cleared."""
    copy = service_pb2.StepResponse()
    copy.CopyFrom(response)
    copy.record.ClearField("iteration_seconds")
    copy.record.ClearField("cumulative_seconds")
    return copy.SerializeToString(deterministic=True)


def test_a_small_step_runs_on_the_loop_and_equals_the_pooled_answer(servers, threads_seen, rng):
    inline, pooled = (_stub(h) for h in servers)
    for options in (
        {"method": "newton"},
        {"method": "newton", "step_policy": "fixed"},
        {"method": "newton_cg"},
        {"method": "saddle_free", "backend": "autograd"},
    ):
        request = _small_step([inline, pooled], rng, **options)
        threads_seen.clear()
        got = inline.NewtonStep(request, timeout=HANG_GUARD)
        want = pooled.NewtonStep(request, timeout=HANG_GUARD)
        assert threads_seen[0] == "hessian-aio", (options, threads_seen)
        assert threads_seen[1].startswith("hessian-rpc"), (options, threads_seen)
        assert _exact(got) == _exact(want), options
    request = _small_step([inline, pooled], rng, method="gradient_descent", learning_rate=0.1)
    threads_seen.clear()
    got = inline.GradientStep(request, timeout=HANG_GUARD)
    want = pooled.GradientStep(request, timeout=HANG_GUARD)
    assert threads_seen[0] == "hessian-aio" and threads_seen[1].startswith("hessian-rpc")
    assert _exact(got) == _exact(want)


def test_a_step_over_the_threshold_runs_on_the_pool(servers, threads_seen, rng):
    inline = _stub(servers[0])
    big = problems.rosenbrock(dim=60)  # size 60^3 = 216,000 > the default 100,000
    pid = inline.CreateProblem(service_pb2.CreateProblemRequest(problem=big)).problem_id
    params = rng.standard_normal(60)
    inline.NewtonStep(
        service_pb2.StepRequest(problem_id=pid, params=tensors.encode(params)), timeout=HANG_GUARD
    )
    assert threads_seen == [threads_seen[0]] and threads_seen[0].startswith("hessian-rpc")


def test_a_step_allowed_more_line_search_trials_than_the_default_runs_on_the_pool(
    servers, threads_seen, rng
):
    """Its loss evaluations are not bounded by a default step's: on the loop, a step with
    armijo 0.9999 and 10^9 trials held every other call (and its deadline) for minutes."""
    inline = _stub(servers[0])
    request = _small_step([inline], rng, max_backtracks=41)
    threads_seen.clear()
    inline.NewtonStep(request, timeout=HANG_GUARD)
    assert threads_seen == [threads_seen[0]] and threads_seen[0].startswith("hessian-rpc")
    request = _small_step([inline], rng, method="newton_cg", cg_max_iterations=10**6)
    threads_seen.clear()  # CG's curvature products are not bounded by a default step's either
    inline.NewtonStep(request, timeout=HANG_GUARD)
    assert threads_seen == [threads_seen[0]] and threads_seen[0].startswith("hessian-rpc")
    request = _small_step([inline], rng, max_backtracks=10**9)
    with pytest.raises(grpc.RpcError) as err:
        inline.NewtonStep(request, timeout=HANG_GUARD)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.max_backtracks: expected an integer in [1, 10000]" in err.value.details()


def test_a_long_pooled_step_leaves_the_loop_serving_small_steps(servers, monkeypatch, rng):
    handle = servers[0]
    stub = _stub(handle)
    started, release = threading.Event(), threading.Event()
    real = service.take_step

    def held(objective, *args, **kwargs):
        if objective.num_params == 60:  # the long one: it works until released
            started.set()
            assert release.wait(HANG_GUARD)
        return real(objective, *args, **kwargs)

    monkeypatch.setattr(service, "take_step", held)
    pid = stub.CreateProblem(
        service_pb2.CreateProblemRequest(problem=problems.rosenbrock(dim=60))
    ).problem_id
    long_request = service_pb2.StepRequest(
        problem_id=pid, params=tensors.encode(rng.standard_normal(60))
    )
    small = _small_step([stub], rng)
    with futures.ThreadPoolExecutor(1) as pool:
        long_call = pool.submit(stub.NewtonStep, long_request, timeout=HANG_GUARD)
        try:
            assert started.wait(HANG_GUARD)
            for _ in range(5):  # answered while the long step still holds its thread
                stub.NewtonStep(small, timeout=HANG_GUARD)
                stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=HANG_GUARD)
            assert not long_call.done()
        finally:
            release.set()
        assert long_call.result(timeout=HANG_GUARD).record.iteration == 0


def test_an_inline_refusal_keeps_its_code_field_and_request_id(servers, threads_seen, rng):
    stub = _stub(servers[0])
    pid = stub.CreateProblem(
        service_pb2.CreateProblemRequest(problem=problems.rosenbrock(dim=4))
    ).problem_id
    _first_by_id(stub, pid, np.zeros(4))
    threads_seen.clear()
    # Rosenbrock has no Gauss-Newton form: the engine refuses it inside take_step, on the loop
    request = service_pb2.StepRequest(
        problem_id=pid,
        params=tensors.encode(rng.standard_normal(4)),
        options=method_options(method="gauss_newton_cg"),
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.NewtonStep(request, timeout=HANG_GUARD, metadata=(("x-request-id", "inline-1"),))
    error = info.value
    assert threads_seen == ["hessian-aio"]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert dict(error.trailing_metadata())["x-request-id"] == "inline-1"
    status = rpc_status.from_call(error)
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert detail.field_violations[0].field.startswith("options."), detail


def test_a_negative_threshold_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--inline-step-below must be >= 0"):
        ServerConfig(inline_step_below=-1).validated()


def test_a_step_that_would_read_the_store_runs_on_the_pool(servers, threads_seen, rng):
    # The first by-id step of a caller reads its hold from the store, behind any commit in
    # progress: never on the loop. Once the hold is remembered, the next one runs inline.
    stub = _stub(servers[0])
    params = rng.standard_normal((6, 4))
    pid = stub.CreateProblem(
        service_pb2.CreateProblemRequest(problem=problems.mse(params))
    ).problem_id
    request = service_pb2.StepRequest(problem_id=pid, params=tensors.encode(params))
    threads_seen.clear()
    stub.NewtonStep(request, timeout=HANG_GUARD)
    stub.NewtonStep(request, timeout=HANG_GUARD)
    assert threads_seen[0].startswith("hessian-rpc") and threads_seen[1] == "hessian-aio"


def test_an_exported_program_never_runs_on_the_loop(servers, threads_seen):
    # An exported program's evaluation may take up to --exported-evaluation-seconds however
    # few its parameters: its steps always take the pool, even small and remembered.
    torch = pytest.importorskip("torch")
    stub = _stub(servers[0])
    X = torch.randn(8, 3, dtype=torch.float64)
    problem = problems.exported(
        lambda p, X: ((X @ p) ** 2).mean(), torch.zeros(3, dtype=torch.float64), {"X": X}
    )
    pid = stub.CreateProblem(service_pb2.CreateProblemRequest(problem=problem)).problem_id
    request = service_pb2.StepRequest(problem_id=pid, params=tensors.encode(np.ones(3)))
    threads_seen.clear()
    for _ in range(3):
        stub.NewtonStep(request, timeout=HANG_GUARD)
    assert len(threads_seen) == 3 and all(t.startswith("hessian-rpc") for t in threads_seen)
