"""StartAndWatchRun: StartRun and WatchRun on one call, and a run's end sent with its last records.

A whole job (start a run, stream it to its end) was two calls, and the run's last records
and its end two events. Checked on a real server on loopback with its real SQLite file:
the one call streams exactly what StartRun then WatchRun stream, bit for bit; its final
parameters are a minimum by an independent numpy gradient; a refused request stores
nothing; the SDK's `start_run(watch=True)` reads that call instead of opening WatchRun.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from conftest import free_port, hold_record, start_server
from hessian_client import Client, InvalidArgument, NotFound, aio, problems, status_name
from hessian_client.options import method_options, stop_criteria
from hessian_client.proto import service_pb2, service_pb2_grpc
from hessian_client.tensors import encode
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective
from hessian_service.server import codec
from hessian_service.server.service import RESPONSE_SLACK
from long_runs import EXACT

TIMEOUT = 120  # generous: guards against a hang only
STOPPING = {
    "max_iterations": 50,
    "gradient_tolerance": 1e-10,
    "function_tolerance": 0.0,
    "parameter_tolerance": 0.0,
}
L2 = 1e-2


def _data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((120, 5))
    y = (x @ rng.standard_normal(5) + 0.5 * rng.standard_normal(120) > 0).astype(np.float64)
    return x, y


def _request(rng: np.random.Generator, **stopping: float) -> service_pb2.StartRunRequest:
    """A Newton run of an inline logistic regression from random parameters."""
    x, y = _data(rng)
    return service_pb2.StartRunRequest(
        problem=problems.logistic_regression(x, y, l2=L2),
        initial_params=encode(0.1 * rng.standard_normal(6)),
        options=method_options(method="newton"),
        stopping=stop_criteria(**{**STOPPING, **stopping}),
    )


def _logistic_gradient(x: np.ndarray, y: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The float64 gradient of mean log-loss + l2/2 |w|^2 (intercept unpenalised), by hand."""
    w, b = params[:-1], params[-1]
    p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
    return np.concatenate([x.T @ (p - y) / len(y) + L2 * w, [np.mean(p - y)]])


def _records(events) -> list:
    return [r for e in events for r in e.records]


def _facts(record) -> tuple:
    """What a record says of the iterate and the step (not its timings)."""
    return (
        record.iteration,
        record.loss,
        record.gradient_norm,
        record.gradient_max_norm,
        record.step_norm,
        record.step_size,
        record.function_evaluations,
    )


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    """A server counting RPCs by method (its Prometheus registry, read in process)."""
    handle = start_server(tmp_path_factory.mktemp("one-call"), metrics_port=free_port())
    yield handle
    handle.stop(grace=1.0)


def _calls(handle, method: str) -> float:
    value = handle.metrics.registry.get_sample_value(
        "hessian_rpcs_total", {"method": method, "code": "OK"}
    )
    return value or 0.0


def test_one_call_streams_what_start_run_then_watch_run_stream(metered):
    rng = np.random.default_rng(torch.initial_seed())
    request = _request(rng)
    with grpc.insecure_channel(metered.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        events = list(stub.StartAndWatchRun(request, timeout=TIMEOUT))
        started = stub.StartRun(request, timeout=TIMEOUT)
        watched = list(
            stub.WatchRun(service_pb2.WatchRunRequest(run_id=started.run_id), timeout=TIMEOUT)
        )
        first = events[0]
        assert first.HasField("started") and not first.records and not first.HasField("final")
        assert first.started.run_id.startswith("r-") and first.started.run_id != started.run_id
        assert [e.HasField("final") for e in events] == [False] * (len(events) - 1) + [True]
        assert not any(e.HasField("started") for e in events[1:] + watched)
        one, two = _records(events), _records(watched)
        assert [r.iteration for r in one] == list(range(len(one))) and len(one) > 2
        assert [_facts(r) for r in one] == [_facts(r) for r in two]
        final = events[-1].final
        assert status_name(final) == "FINISHED" and final.converged
        assert final.num_records == len(one) == watched[-1].final.num_records
        stored = stub.GetRun(
            service_pb2.GetRunRequest(run_id=first.started.run_id, include_params=True)
        )
    assert status_name(stored) == "FINISHED" and stored.num_records == len(one)
    x, y = _data(np.random.default_rng(torch.initial_seed()))
    params = np.frombuffer(stored.final_params.data, dtype=np.float64)
    # the stopping test's max-norm, against an independent float64 gradient
    assert np.max(np.abs(_logistic_gradient(x, y, params))) <= 1e-9
    assert one[-1].loss == final.last_record.loss


def test_a_refused_one_call_names_the_field_and_stores_no_run(metered):
    rng = np.random.default_rng(torch.initial_seed())
    with grpc.insecure_channel(metered.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        before = len(stub.ListRuns(service_pb2.ListRunsRequest(page_size=1000)).runs)
        bad = _request(rng)
        bad.stopping.max_iterations = -1
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StartAndWatchRun(bad, timeout=TIMEOUT))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("stopping.max_iterations")
        missing = _request(rng)
        missing.problem_id = "p-" + "0" * 40
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StartAndWatchRun(missing, timeout=TIMEOUT))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details().startswith("problem_id")
        after = len(stub.ListRuns(service_pb2.ListRunsRequest(page_size=1000)).runs)
    assert after == before


def test_sdk_watch_reads_the_open_call_not_watch_run(metered):
    rng = np.random.default_rng(torch.initial_seed())
    x, y = _data(rng)
    w0 = 0.1 * rng.standard_normal(6)
    problem = problems.logistic_regression(x, y, l2=L2)
    with Client(metered.address, timeout=TIMEOUT) as client:
        plain = client.start_run(problem, w0, method="newton", stopping=STOPPING).records()
        watches, ones = _calls(metered, "WatchRun"), _calls(metered, "StartAndWatchRun")
        run = client.start_run(problem, w0, method="newton", stopping=STOPPING, watch=True)
        streamed = list(run.stream())
        assert _calls(metered, "WatchRun") == watches  # the records came on the open call
        assert _calls(metered, "StartAndWatchRun") == ones + 1
        assert [(r.iteration, r.loss, r.gradient_norm) for r in streamed] == [
            (r.iteration, r.loss, r.gradient_norm) for r in plain
        ]
        assert run.final is not None and run.final.status == "FINISHED"
        assert run.final.num_records == len(streamed)
        # a later stream of the same handle, and a bounded one, use WatchRun as before
        assert [r.loss for r in run.stream()] == [r.loss for r in streamed]
        bounded = client.start_run(problem, w0, method="newton", stopping=STOPPING, watch=True)
        assert [r.loss for r in bounded.stream(timeout=TIMEOUT)] == [r.loss for r in streamed]
        gets = _calls(metered, "GetRun")
        result = client.start_run(
            problem, w0, method="newton", stopping=STOPPING, watch=True
        ).result()
        assert _calls(metered, "GetRun") == gets + 1  # the parameters, nothing before
        assert result.info.status == "FINISHED" and isinstance(result.params, np.ndarray)
        assert np.max(np.abs(_logistic_gradient(x, y, result.params))) <= 1e-9
        with pytest.raises(InvalidArgument, match=r"stopping\.max_iterations"):
            client.start_run(problem, w0, stopping={"max_iterations": -1}, watch=True)
        with pytest.raises(NotFound, match="problem_id"):
            client.start_run("p-" + "0" * 40, w0, watch=True)


def test_async_sdk_watch_streams_the_same_records(metered):
    rng = np.random.default_rng(torch.initial_seed())
    x, y = _data(rng)
    w0 = 0.1 * rng.standard_normal(6)
    problem = problems.logistic_regression(x, y, l2=L2)

    async def both() -> tuple[list, list, object]:
        async with aio.Client(metered.address, timeout=TIMEOUT) as client:
            plain = await (await client.start_run(problem, w0, stopping=STOPPING)).records()
            run = await client.start_run(problem, w0, stopping=STOPPING, watch=True)
            watched = [r async for r in run.stream()]
            with pytest.raises(InvalidArgument, match=r"stopping\.max_iterations"):
                await client.start_run(problem, w0, stopping={"max_iterations": -1}, watch=True)
            return plain, watched, run.final

    plain, watched, final = asyncio.run(both())
    assert [(r.iteration, r.loss) for r in watched] == [(r.iteration, r.loss) for r in plain]
    assert final is not None and final.status == "FINISHED" and final.num_records == len(plain)


@pytest.fixture
def end_only(tmp_path, monkeypatch):
    """A server whose flusher never commits (an hour's interval, a batch no run fills): a run's
    records are committed only with its end, and a run waits before its first record until a
    watcher listens, so the watcher certainly sees the end arrive."""
    handle = start_server(tmp_path, commit_interval_ms=3_600_000, commit_every_records=10**6)

    def watched(run_id: str) -> bool:
        live = handle.runs.live(run_id)
        return live is not None and live.watchers > 0

    held = hold_record(monkeypatch, handle.store, 0, watched)
    yield handle, held
    handle.stop(grace=1.0)


@pytest.mark.parametrize("how", ["WatchRun", "StartAndWatchRun"])
def test_a_runs_last_records_come_with_its_end_in_one_event(end_only, how):
    handle, held = end_only
    rng = np.random.default_rng(torch.initial_seed())
    request = _request(rng)
    with grpc.insecure_channel(handle.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        if how == "WatchRun":
            run_id = stub.StartRun(request, timeout=TIMEOUT).run_id
            events = list(
                stub.WatchRun(service_pb2.WatchRunRequest(run_id=run_id), timeout=TIMEOUT)
            )
        else:
            events = list(stub.StartAndWatchRun(request, timeout=TIMEOUT))[1:]
    assert held == [True]  # the run waited for its watcher, which saw it end
    assert len(events) == 1, [(len(e.records), e.HasField("final")) for e in events]
    (event,) = events
    assert event.HasField("final") and status_name(event.final) == "FINISHED"
    assert [r.iteration for r in event.records] == list(range(event.final.num_records))


def test_concurrent_one_call_jobs_match_solo_ones_bit_for_bit(metered):
    rng = np.random.default_rng(torch.initial_seed())
    requests = [_request(rng) for _ in range(6)]
    with grpc.insecure_channel(metered.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)

        def job(request) -> list[tuple]:
            events = list(stub.StartAndWatchRun(request, timeout=TIMEOUT))
            return [_facts(r) for r in _records(events)]

        solo = [job(r) for r in requests]
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(job, requests, timeout=TIMEOUT))
    assert together == solo


class _Unimplemented(grpc.RpcError):
    """What a server before API 1.2 answers StartAndWatchRun."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNIMPLEMENTED

    def details(self) -> str:
        return "Method not found!"


def test_sdk_watch_falls_back_to_start_run_on_an_older_server(metered, monkeypatch):
    rng = np.random.default_rng(torch.initial_seed())
    x, y = _data(rng)
    w0 = 0.1 * rng.standard_normal(6)
    problem = problems.logistic_regression(x, y, l2=L2)
    with Client(metered.address, timeout=TIMEOUT) as client:
        plain = client.start_run(problem, w0, stopping=STOPPING).records()

        def unimplemented(*_args, **_kwargs):
            raise _Unimplemented()
            yield  # pragma: no cover (a generator, like a streaming call)

        monkeypatch.setattr(client.stub, "StartAndWatchRun", unimplemented)
        starts, watches = _calls(metered, "StartRun"), _calls(metered, "WatchRun")
        run = client.start_run(problem, w0, stopping=STOPPING, watch=True)
        assert [r.loss for r in run.stream()] == [r.loss for r in plain]
    assert _calls(metered, "StartRun") == starts + 1
    assert _calls(metered, "WatchRun") == watches + 1


def test_a_stream_outliving_the_client_timeout_goes_on_with_watch_run(tmp_path, monkeypatch):
    """The one call's deadline is the client's timeout (it bounds the start); a run still
    streaming then is followed on WatchRun from the next record, each record once."""
    handle = start_server(tmp_path, metrics_port=free_port())
    past = threading.Event()
    try:
        held = hold_record(monkeypatch, handle.store, 3, lambda _: past.is_set())
        rng = np.random.default_rng(torch.initial_seed())
        x, y = _data(rng)
        problem = problems.logistic_regression(x, y, l2=L2)
        gd = {"method": "gradient_descent", "learning_rate": 0.5}
        stopping = {**STOPPING, "max_iterations": 12, "gradient_tolerance": 0.0}
        with Client(handle.address, timeout=1.0) as client:
            run = client.start_run(problem, np.zeros(6), stopping=stopping, watch=True, **gd)
            stream = run.stream()
            early = [next(stream) for _ in range(3)]  # 0..2, on the open call
            threading.Timer(2.5, past.set).start()  # held past the call's deadline
            records = early + list(stream)
        assert held == [True]
        assert [r.iteration for r in records] == list(range(13))
        assert run.final is not None and run.final.status == "FINISHED"
        # the one call ended at its deadline (not OK); one WatchRun brought the rest
        assert (_calls(handle, "StartAndWatchRun"), _calls(handle, "WatchRun")) == (0, 1)
    finally:
        past.set()
        handle.stop(grace=1.0)


def test_a_last_page_and_a_long_run_info_too_big_for_one_message_come_in_two(tmp_path, monkeypatch):
    """Pages fill a message but for a slack; a full last page and the final RunInfo (a
    256-character name) do not fit one message, so they come as two. Pages are sized for the
    widest record, so the width is set to these records' own to make the pages full."""
    gd = {"method": "gradient_descent", "learning_rate": 1e-3}
    page, iterations = 4, 7
    engine_run = Run(
        make_objective("rosenbrock", {}, {"dim": 2}),
        torch.zeros(2, dtype=torch.float64),
        MethodOptions(**gd),
        StopCriteria(max_iterations=iterations, **EXACT),
    )
    width = max(codec.record_to_wire(r).ByteSize() for r in engine_run) + 4  # + its tag
    monkeypatch.setattr(codec, "MAX_RECORD_BYTES", width)
    limit = RESPONSE_SLACK + page * width
    handle = start_server(
        tmp_path,
        max_message_bytes=limit,
        commit_interval_ms=3_600_000,
        commit_every_records=10**6,
    )

    def watched(run_id: str) -> bool:
        live = handle.runs.live(run_id)
        return live is not None and live.watchers > 0

    try:
        held = hold_record(monkeypatch, handle.store, 0, watched)
        with Client(handle.address, timeout=TIMEOUT) as client:
            stopping = {"max_iterations": iterations, **EXACT}
            run = client.start_run(
                problems.rosenbrock(dim=2), np.zeros(2), stopping=stopping, name="n" * 256, **gd
            )
            request = service_pb2.WatchRunRequest(run_id=run.id)
            events = list(client.stub.WatchRun(request, timeout=TIMEOUT))
        assert held == [True]
        assert all(e.ByteSize() <= limit for e in events)
        assert [len(e.records) for e in events] == [page, page, 0]
        assert [e.HasField("final") for e in events] == [False, False, True]
        assert status_name(events[-1].final) == "FINISHED" and events[-1].final.name == "n" * 256
    finally:
        handle.stop(grace=1.0)
