"""Deadlines reach the computation: abandoned unary work stops part-way and is counted.

A real in-process server with metrics; its engine entry points are wrapped (not replaced)
to observe, server-side, when the work starts and how it ended. A call on a deliberately
big problem is abandoned (client deadline, or the client cancels); the engine work must
end with Cancelled for that reason (not run to the end), the server must count it in
hessian_cancelled_work_total{method, reason}, and answer the next call correctly.
Nothing here depends on how fast the machine is: waits are on events, with generous bounds
that only guard against hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
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
from hessian_service.server import service

HANG_GUARD = 120  # seconds; the cancelled work stops long before, the uncancelled would not


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
    return problem, 0.3 * rng.standard_normal(3235)


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


def _spectrum_request(rpc) -> service_pb2.AnalyzeCurvatureRequest:
    problem, params = _big_mlp(np.random.default_rng(torch.initial_seed()))
    pid = rpc.CreateProblem(service_pb2.CreateProblemRequest(problem=problem), timeout=60)
    options = spectrum_options(
        backend="autograd", max_lanczos_iterations=300, trace_samples=300, density_probes=0
    )
    return service_pb2.AnalyzeCurvatureRequest(
        problem_id=pid.problem_id, params=tensors.encode(params), options=options
    )


def test_analyze_curvature_past_its_deadline_stops_and_the_server_answers_next(
    handle, rpc, monkeypatch
):
    work = Observed(monkeypatch, "analyze_curvature")
    request = _spectrum_request(rpc)
    before = _cancelled_count(handle, "AnalyzeCurvature", "deadline")
    with pytest.raises(grpc.RpcError) as err:
        rpc.AnalyzeCurvature(request, timeout=2.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert work.started.is_set()
    ended = work.outcome()
    assert isinstance(ended, Cancelled), f"the work was not stopped: {ended!r}"
    assert ended.reason == "deadline"
    assert "products" in str(ended)  # stopped between products, not before it began
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
    work = Observed(monkeypatch, "dense_curvature")
    problem, params = _big_mlp(np.random.default_rng(torch.initial_seed()))
    opts = method_options(backend="autograd")
    request = service_pb2.ComputeHessianRequest(
        problem=problem, params=tensors.encode(params), backend=opts.backend, omit_matrix=True
    )
    before = _cancelled_count(handle, "ComputeHessian", "deadline")
    with pytest.raises(grpc.RpcError) as err:
        rpc.ComputeHessian(request, timeout=2.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ended = work.outcome()
    assert isinstance(ended, Cancelled), f"the work was not stopped: {ended!r}"
    assert ended.reason == "deadline"
    assert "Hessian rows" in str(ended)
    _wait_count(handle, "ComputeHessian", "deadline", before + 1)
    _answers_next_call(rpc)


def _aio_outcome(kind: str, cancel_by: str) -> str | None:
    """The reason a call_token built inside a grpc.aio handler reports once the call ends.

    kind: an async handler (work in an executor), or a sync handler in aio's
    migration_thread_pool. cancel_by: "deadline" (a 0.5 s client deadline) or "client" (the
    client cancels once the work has started). The work waits for its token, bounded.
    """
    started, finished = threading.Event(), threading.Event()
    reasons: list[str | None] = []

    def work(token) -> None:
        started.set()
        stop = time.monotonic() + HANG_GUARD
        while not token.cancelled and time.monotonic() < stop:
            time.sleep(0.01)
        reasons.append(token.reason)
        finished.set()

    def sync_handler(request, context):
        work(service.call_token(context))
        return b""

    async def async_handler(request, context):
        token = service.call_token(context)
        await asyncio.get_running_loop().run_in_executor(None, work, token)
        return b""

    method = async_handler if kind == "async" else sync_handler
    handlers = grpc.method_handlers_generic_handler(
        "t.Cancel", {"Work": grpc.unary_unary_rpc_method_handler(method)}
    )

    async def scenario() -> None:
        with futures.ThreadPoolExecutor(2) as pool:
            server = grpc.aio.server(migration_thread_pool=pool)
            server.add_generic_rpc_handlers((handlers,))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            loop = asyncio.get_running_loop()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/t.Cancel/Work")(
                    b"", timeout=0.5 if cancel_by == "deadline" else None
                )
                if cancel_by == "client":
                    assert await loop.run_in_executor(None, started.wait, HANG_GUARD)
                    call.cancel()
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                    await call
                assert await loop.run_in_executor(None, finished.wait, HANG_GUARD)
            await server.stop(None)

    asyncio.run(scenario())
    return reasons[0]


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
