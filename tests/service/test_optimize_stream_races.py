"""Optimize streams against races and idle callers.

A caller whose run missed --optimize-evaluation-seconds while another caller resumed it
was told how the run stood after the resume (QUEUED or RUNNING, a success-shaped result in
the SDK), not how its own execution ended (INTERRUPTED by its deadline). And streams that
never sent their first request were neither counted against --max-optimize-streams-per-token
nor ever ended, so one token could hold any number of server handlers. And a cancelled
Optimize run's message said "the call was cancelled", whoever had cancelled it.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from conftest import start_server
from hessian_client import Client, HessianError, minimize, tensors
from hessian_client.proto import service_pb2, service_pb2_grpc
from hessian_service.server.runs import RunManager
from hessian_service.store import RunStatus, SQLiteRunStore, StoreError
from optimize_stream import Stream

X0 = np.array([-1.2, 1.0, 0.8])
EVALUATION_SECONDS = 1.0
GUARD = 20.0


@pytest.fixture
def handle(tmp_path):
    server = start_server(
        tmp_path,
        optimize_evaluation_seconds=EVALUATION_SECONDS,
        max_optimize_streams_per_token=2,
    )
    yield server
    server.stop()


def _start() -> service_pb2.OptimizeRequest:
    start = service_pb2.OptimizeStart(
        initial_params=tensors.encode(X0), capabilities=service_pb2.Capabilities(gradient=True)
    )
    return service_pb2.OptimizeRequest(start=start)


@pytest.mark.parametrize("b_ended", [False, True])
def test_a_caller_whose_run_was_resumed_by_another_is_told_its_own_end(
    handle, monkeypatch, b_ended
):
    # A's run misses its deadline (INTERRUPTED); B resumes it (and maybe ends it: stop)
    # before A's stream has read the run's end back, so that read finds B's run
    real_get = RunManager.get
    seen_interrupted, release = threading.Event(), threading.Event()

    def get(self, run_id, scope=None):
        row = real_get(self, run_id, scope)
        if row.status == RunStatus.INTERRUPTED and not seen_interrupted.is_set():
            seen_interrupted.set()  # the first read of the end: A's stream
            assert release.wait(GUARD)
            return real_get(self, run_id, scope)
        return row

    monkeypatch.setattr(RunManager, "get", get)
    a = Stream(handle.address, _start())
    run_id = a.read().started.run_id
    assert a.read().WhichOneof("kind") == "evaluate"  # never answered: the deadline passes
    try:
        assert seen_interrupted.wait(GUARD)
        b = Stream(handle.address, service_pb2.OptimizeRequest(resume_run_id=run_id))
        assert b.read().started.run_id == run_id
        assert b.read().WhichOneof("kind") == "evaluate"  # B drives the run now
        if b_ended:
            b.send(stop=True)
            assert b.finish().status == service_pb2.RUN_STATUS_CANCELLED
        release.set()
        finished = a.finish()
        assert finished.status == service_pb2.RUN_STATUS_INTERRUPTED, finished
        assert "the per-evaluation deadline" in finished.message
        b.close()
    finally:
        release.set()
        a.close()


def test_streams_that_never_send_a_request_count_and_end(handle):
    channel = grpc.insecure_channel(handle.address)
    stub = service_pb2_grpc.HessianServiceStub(channel)
    hold = threading.Event()

    def never():
        hold.wait(GUARD)
        return
        yield  # an iterator that sends nothing until the test ends

    idle = [stub.Optimize(never(), timeout=GUARD) for _ in range(2)]
    try:
        time.sleep(0.3)  # both reach the server and hold the token's two slots
        refused = Stream(handle.address, _start()).refusal()
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
        assert "max_optimize_streams_per_token" in refused.details()
        for call in idle:  # ended by the server once the evaluation deadline passed
            with pytest.raises(grpc.RpcError) as err:
                next(call)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert err.value.details().startswith("start: no first request within")
        stream = Stream(handle.address, _start())  # the slots are free again
        assert stream.read().WhichOneof("kind") == "started"
        stream.close()
    finally:
        hold.set()
        channel.close()


@pytest.mark.parametrize("how", ["stop", "CancelRun"])
def test_a_cancelled_optimize_run_says_who_cancelled_it(handle, how):
    # "the call was cancelled; the computation stopped waiting for the caller": written for
    # a unary call, it was every Optimize run's end, whether its caller asked it to stop or
    # a CancelRun did
    stream = Stream(handle.address, _start())
    run_id = stream.read().started.run_id
    assert stream.read().WhichOneof("kind") == "evaluate"
    try:
        if how == "stop":
            stream.send(stop=True)
        else:
            channel = grpc.insecure_channel(handle.address)
            stub = service_pb2_grpc.HessianServiceStub(channel)
            stub.CancelRun(service_pb2.CancelRunRequest(run_id=run_id), timeout=GUARD)
            channel.close()
        finished = stream.finish()
    finally:
        stream.close()
    assert finished.status == service_pb2.RUN_STATUS_CANCELLED, finished
    cause = "its caller's stop request" if how == "stop" else "CancelRun"
    assert finished.message.endswith(f"(by {cause})"), finished.message
    assert "the call was cancelled" not in finished.message


def test_a_stop_then_a_close_at_once_ends_the_run_cancelled(handle):
    """A stop followed at once by the end of the requests ended the run INTERRUPTED, "the
    caller closed its Optimize stream", resumable: the close woke the waiting worker with
    "caller lost" before it looked at the cancel. The stop came first. (A cancel right after
    the stop may overtake it on the wire: that outcome is the race it is.)"""
    for _ in range(5):
        stream = Stream(handle.address, _start())
        run_id = stream.read().started.run_id
        assert stream.read().WhichOneof("kind") == "evaluate"
        stream.send(stop=True)
        stream.outgoing.put(None)  # no more requests: the stream's half-close
        finished = stream.finish()
        stream.close()
        assert finished.status == service_pb2.RUN_STATUS_CANCELLED, finished
        with Client(handle.address) as client:
            assert client.get_run(run_id).status == "CANCELLED"


def test_a_run_whose_end_was_not_stored_is_not_reported_as_that_end(handle, monkeypatch):
    # the store refuses the run's end (its checkpoint too): the stream said FINISHED and
    # converged with the starting point as the answer, while GetRun said INTERRUPTED
    def refuse(*_args, **_kwargs):
        raise StoreError("disk I/O error (injected)")

    real_update = SQLiteRunStore.update_run

    def update_run(self, run_id, **fields):
        if fields.get("status") == RunStatus.FINISHED:
            refuse()
        return real_update(self, run_id, **fields)

    monkeypatch.setattr(SQLiteRunStore, "finish_run", refuse)
    monkeypatch.setattr(SQLiteRunStore, "put_checkpoint", refuse)
    monkeypatch.setattr(SQLiteRunStore, "update_run", update_run)
    with pytest.raises(HessianError) as err:  # what a broken store's run is: resumable
        minimize(
            lambda x: float(((x - 1) ** 2).sum()),
            np.zeros(3),
            jac=lambda x: 2 * (x - 1),
            hess=lambda x: 2 * np.eye(x.size),
            method="newton",
            address=handle.address,
        )
    run_id = err.value.run_id
    assert "the run stopped but its end could not be stored" in str(err.value), err.value
    with Client(handle.address, timeout=GUARD) as client:
        assert client.get_run(run_id).status == "INTERRUPTED"
