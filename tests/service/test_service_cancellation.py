"""Deadlines reach the computation: abandoned unary work stops part-way and is counted.

A real in-process server with metrics; its engine entry points are wrapped (not replaced)
to observe, server-side, when the work starts and how it ended. A call on a deliberately
big problem is abandoned (client deadline, or the client cancels); the engine work must
end with Cancelled for that reason (not run to the end), the server must count it in
hessian_cancelled_work_total{method, reason}, and answer the next call correctly.
Nothing here depends on how fast the machine is: waits are on events, with generous bounds
that only guard against hangs. A deadline test holds the work at its first product (row
chunk) until the client has seen DEADLINE_EXCEEDED, and retries with a longer deadline only
when the server had not reached that point in time (its start is the one thing a deadline
races).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import types
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from conftest import free_port, start_server
from hessian_client import problems, tensors
from hessian_client.curvature import spectrum_options
from hessian_client.options import method_options
from hessian_client.proto import service_pb2, service_pb2_grpc
from hessian_service.engine import Cancelled, SpectrumOptions, analyze_curvature, make_objective
from hessian_service.engine import cancel as engine_cancel
from hessian_service.server import service

HANG_GUARD = 120  # seconds; the cancelled work stops long before, the uncancelled would not
# A call's deadline: the next one only when the server had not reached the work in time.
DEADLINES = (2.0, 4.0, 8.0, 16.0, 32.0)
AIO_DEADLINES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("cancel"), metrics_port=free_port())
    yield server
    server.stop(grace=1.0)


@pytest.fixture(scope="module")
def rpc(handle):
    with grpc.insecure_channel(handle.address) as channel:
        yield service_pb2_grpc.HessianServiceStub(channel)


def _big_mlp(rng: np.random.Generator) -> tuple:
    """An mlp of 3,235 parameters on 2,000 rows: minutes of curvature work, not seconds."""
    x = rng.standard_normal((2000, 30))
    y = rng.standard_normal((2000, 5))
    problem = problems.mlp(x, y, layer_sizes=[30, 50, 30, 5], activation="tanh")
    return problem, _big_params(rng)


def _big_params(rng: np.random.Generator) -> np.ndarray:
    return 0.3 * rng.standard_normal(3235)


class Observed:
    """Wraps an engine entry point of the service module: signals its start, keeps its end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.started = threading.Event()
        self.outcomes: queue.Queue = queue.Queue()
        real = getattr(service, name)

        def observed(*args, **kwargs):
            self.started.set()
            try:
                result = real(*args, **kwargs)
            except BaseException as exc:
                self.outcomes.put(exc)
                raise
            self.outcomes.put(result)
            return result

        monkeypatch.setattr(service, name, observed)

    def outcome(self) -> object:
        return self.outcomes.get(timeout=HANG_GUARD)


class Attempt:
    """One call of HeldWork: its work reached the hold, is released, and how it ended."""

    def __init__(self) -> None:
        self.reached, self.release = threading.Event(), threading.Event()
        self.token: engine_cancel.CancelToken | None = None
        self.outcomes: queue.Queue = queue.Queue()

    def outcome(self) -> object:
        return self.outcomes.get(timeout=HANG_GUARD)


class HeldWork:
    """Wraps an engine entry point of the service module (called as (objective, params,
    options, cancel, ...)) for calls on the params of an expected Attempt: its first cancel
    check whose place names `marker` (the first product or row chunk) holds until released,
    then waits for the call's token to be cancelled, so the work stops exactly there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, marker: str) -> None:
        self.attempts: dict[float, Attempt] = {}
        local = threading.local()  # the attempt the current handler thread works for
        real, real_check = getattr(service, name), engine_cancel.check

        def observed(objective, params, options, cancel, *args, **kwargs):
            attempt = self.attempts.get(float(params.reshape(-1)[0]))
            if attempt is None:
                return real(objective, params, options, cancel, *args, **kwargs)
            attempt.token, local.attempt = cancel, attempt
            try:
                result = real(objective, params, options, cancel, *args, **kwargs)
            except BaseException as exc:
                attempt.outcomes.put(exc)
                raise
            finally:
                local.attempt = None
            attempt.outcomes.put(result)
            return result

        def check(where: str = "") -> None:
            attempt = getattr(local, "attempt", None)
            if attempt is not None and marker in where and not attempt.reached.is_set():
                attempt.reached.set()
                attempt.release.wait(HANG_GUARD)
                stop = time.monotonic() + HANG_GUARD
                while not attempt.token.cancelled and time.monotonic() < stop:
                    time.sleep(0.005)  # the server's copy of the deadline, ms after the client's
            real_check(where)

        monkeypatch.setattr(service, name, observed)
        monkeypatch.setattr(engine_cancel, "check", check)

    def expect(self, params: np.ndarray) -> Attempt:
        attempt = self.attempts[float(params[0])] = Attempt()
        return attempt


def _cut_by_a_deadline(held: HeldWork, call, request_for) -> Attempt:
    """Calls `call(request_for(params), timeout=...)` on fresh params until the call's
    deadline passed while its work was held at its first product: the first try whose work
    had reached the hold when the client saw DEADLINE_EXCEEDED (a later try only if the
    server had not got there within the deadline). Returns that attempt, released."""
    rng = np.random.default_rng(torch.initial_seed())
    for timeout in DEADLINES:
        params = _big_params(rng)
        attempt = held.expect(params)
        try:
            with pytest.raises(grpc.RpcError) as err:
                call(request_for(params), timeout=timeout)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            in_time = attempt.reached.is_set()
        finally:
            attempt.release.set()
        if in_time:
            return attempt
    pytest.fail(f"the server never reached the work within a {DEADLINES[-1]} s deadline")


def _cancelled_count(handle, method: str, reason: str) -> float:
    value = handle.metrics.registry.get_sample_value(
        "hessian_cancelled_work_total", {"method": method, "reason": reason}
    )
    return value or 0.0


def _wait_count(handle, method: str, reason: str, at_least: float) -> float:
    stop = time.monotonic() + HANG_GUARD
    while (count := _cancelled_count(handle, method, reason)) < at_least:
        assert time.monotonic() < stop, f"{method}/{reason} never counted"
        time.sleep(0.05)
    return count


def _answers_next_call(rpc) -> None:
    """A small AnalyzeCurvature right after: answered, and equal to the engine's own answer."""
    rng = np.random.default_rng(torch.initial_seed())
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    params = 0.5 * rng.standard_normal(3 * 4 + 4 + 4 * 2 + 2)
    problem = problems.mlp(x, y, layer_sizes=[3, 4, 2], activation="tanh")
    options = {"backend": "autograd", "top_k": 1, "bottom_k": 1, "trace_samples": 0}
    response = rpc.AnalyzeCurvature(
        service_pb2.AnalyzeCurvatureRequest(
            problem=problem, params=tensors.encode(params), options=spectrum_options(**options)
        ),
        timeout=HANG_GUARD,
    )
    objective = make_objective(
        "mlp",
        {"X": torch.from_numpy(x), "y": torch.from_numpy(y)},
        {"layer_sizes": [3, 4, 2], "activation": "tanh"},
    )
    expected = analyze_curvature(objective, torch.from_numpy(params), SpectrumOptions(**options))
    assert list(response.top_eigenvalues) == expected.top_eigenvalues
    assert list(response.bottom_eigenvalues) == expected.bottom_eigenvalues


def _spectrum_requests(rpc):
    """A function of params -> an AnalyzeCurvatureRequest on one big stored problem."""
    problem, _ = _big_mlp(np.random.default_rng(torch.initial_seed()))
    pid = rpc.CreateProblem(service_pb2.CreateProblemRequest(problem=problem), timeout=60)
    options = spectrum_options(
        backend="autograd", max_lanczos_iterations=300, trace_samples=300, density_probes=0
    )

    def request_for(params: np.ndarray) -> service_pb2.AnalyzeCurvatureRequest:
        return service_pb2.AnalyzeCurvatureRequest(
            problem_id=pid.problem_id, params=tensors.encode(params), options=options
        )

    return request_for


def _spectrum_request(rpc) -> service_pb2.AnalyzeCurvatureRequest:
    return _spectrum_requests(rpc)(_big_params(np.random.default_rng(torch.initial_seed())))


def test_analyze_curvature_past_its_deadline_stops_and_the_server_answers_next(
    handle, rpc, monkeypatch
):
    held = HeldWork(monkeypatch, "analyze_curvature", "products")
    request_for = _spectrum_requests(rpc)
    before = _cancelled_count(handle, "AnalyzeCurvature", "deadline")
    work = _cut_by_a_deadline(held, rpc.AnalyzeCurvature, request_for)
    assert work.reached.is_set()  # the engine began its products before the deadline
    ended = work.outcome()
    assert isinstance(ended, Cancelled), f"the work was not stopped: {ended!r}"
    assert ended.reason == "deadline"
    assert "products" in str(ended)  # stopped at a product check, not before the work began
    _wait_count(handle, "AnalyzeCurvature", "deadline", before + 1)
    _answers_next_call(rpc)


def test_analyze_curvature_the_client_cancels_stops(handle, rpc, monkeypatch):
    work = Observed(monkeypatch, "analyze_curvature")
    before = _cancelled_count(handle, "AnalyzeCurvature", "cancelled")
    call = rpc.AnalyzeCurvature.future(_spectrum_request(rpc), timeout=None)
    assert work.started.wait(HANG_GUARD)
    call.cancel()
    ended = work.outcome()
    assert isinstance(ended, Cancelled), f"the work was not stopped: {ended!r}"
    assert ended.reason == "cancelled"
    _wait_count(handle, "AnalyzeCurvature", "cancelled", before + 1)
    _answers_next_call(rpc)


def test_compute_hessian_past_its_deadline_stops_between_row_chunks(handle, rpc, monkeypatch):
    held = HeldWork(monkeypatch, "dense_curvature", "Hessian rows")
    problem, _ = _big_mlp(np.random.default_rng(torch.initial_seed()))
    opts = method_options(backend="autograd")

    def request_for(params: np.ndarray) -> service_pb2.ComputeHessianRequest:
        return service_pb2.ComputeHessianRequest(
            problem=problem, params=tensors.encode(params), backend=opts.backend, omit_matrix=True
        )

    before = _cancelled_count(handle, "ComputeHessian", "deadline")
    work = _cut_by_a_deadline(held, rpc.ComputeHessian, request_for)
    assert work.reached.is_set()  # the engine began its row chunks before the deadline
    ended = work.outcome()
    assert isinstance(ended, Cancelled), f"the work was not stopped: {ended!r}"
    assert ended.reason == "deadline"
    assert "Hessian rows" in str(ended)
    _wait_count(handle, "ComputeHessian", "deadline", before + 1)
    _answers_next_call(rpc)


def _aio_outcome(kind: str, cancel_by: str) -> str | None:
    """The reason a call_token built inside a grpc.aio handler reports once the call ends.

    kind: an async handler (work in an executor), or a sync handler in aio's
    migration_thread_pool. cancel_by: "deadline" (a client deadline: 0.5 s, longer only when
    the handler had not started before it passed) or "client" (the client cancels once the
    work has started). The work waits for its token, bounded.
    """
    attempts: dict[bytes, types.SimpleNamespace] = {}  # by request: each call's own events

    def work(token, attempt) -> None:
        attempt.started.set()
        stop = time.monotonic() + HANG_GUARD
        while not token.cancelled and time.monotonic() < stop:
            time.sleep(0.01)
        attempt.reason = token.reason
        attempt.finished.set()

    def sync_handler(request, context):
        work(service.call_token(context), attempts[request])
        return b""

    async def async_handler(request, context):
        token = service.call_token(context)
        await asyncio.get_running_loop().run_in_executor(None, work, token, attempts[request])
        return b""

    method = async_handler if kind == "async" else sync_handler
    handlers = grpc.method_handlers_generic_handler(
        "t.Cancel", {"Work": grpc.unary_unary_rpc_method_handler(method)}
    )

    async def scenario() -> types.SimpleNamespace:
        with futures.ThreadPoolExecutor(2) as pool:
            server = grpc.aio.server(migration_thread_pool=pool)
            server.add_generic_rpc_handlers((handlers,))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            loop = asyncio.get_running_loop()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                deadlines = AIO_DEADLINES if cancel_by == "deadline" else (None,)
                for i, timeout in enumerate(deadlines):
                    key = str(i).encode()
                    attempt = attempts[key] = types.SimpleNamespace(
                        started=threading.Event(), finished=threading.Event(), reason=None
                    )
                    call = channel.unary_unary("/t.Cancel/Work")(key, timeout=timeout)
                    if cancel_by == "client":
                        assert await loop.run_in_executor(None, attempt.started.wait, HANG_GUARD)
                        call.cancel()
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                        await call
                    if attempt.started.is_set():  # the call ended while its work ran
                        break
                else:
                    pytest.fail(f"the handler never started within {deadlines[-1]} s")
                assert await loop.run_in_executor(None, attempt.finished.wait, HANG_GUARD)
            await server.stop(None)
            return attempt

    return asyncio.run(scenario()).reason


@pytest.mark.parametrize(
    "kind,cancel_by,reason",
    [
        ("async", "deadline", "deadline"),
        ("async", "client", "cancelled"),
        ("sync_in_migration_pool", "deadline", "deadline"),
    ],
)
def test_call_token_on_grpc_aio(kind, cancel_by, reason):
    """The glue works on grpc.aio too (a sync handler there learns of its deadline only)."""
    assert _aio_outcome(kind, cancel_by) == reason
