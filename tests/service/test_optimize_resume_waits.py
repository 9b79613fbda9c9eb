"""Optimize's resume_run_id: what can never be resumed is refused at once, and a resume that
waits for a live run's old stream to let go holds no server thread. Before, every resume
waited up to --optimize-evaluation-seconds on an RPC thread before looking at the run, so
a run that was not an Optimize run took a minute to refuse and a few dozen such streams
starved every other call."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from conftest import start_server, wait_until
from hessian_client import Client, minimize, problems, tensors
from hessian_client.proto import service_pb2, service_pb2_grpc
from hessian_service.server.optimize import Optimizer
from hessian_service.server.runs import RunManager
from optimize_stream import Stream
from scipy.optimize import rosen, rosen_der, rosen_hess

X0 = np.array([-1.2, 1.0, 0.8, 1.4])
WAIT = 600.0  # --optimize-evaluation-seconds: a resume that waited it out would time out
GUARD = 20  # seconds each stream here may take: far below WAIT


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("resume"), rpc_threads=4, optimize_evaluation_seconds=WAIT
    )
    yield server
    server.stop()


def _attached_optimize(address: str) -> tuple[Stream, str]:
    """An Optimize run whose caller is attached and holds its first evaluation unanswered."""
    start = service_pb2.OptimizeStart(
        initial_params=tensors.encode(X0),
        capabilities=service_pb2.Capabilities(gradient=True, hessian=True),
    )
    stream = Stream(address, service_pb2.OptimizeRequest(start=start))
    run_id = stream.read().started.run_id
    assert stream.read().WhichOneof("kind") == "evaluate"
    return stream, run_id


def test_what_can_never_be_resumed_is_refused_at_once(handle):
    address = handle.address
    with Client(address, timeout=GUARD) as client:
        ordinary = client.start_run(problems.rosenbrock(dim=4), X0, stopping={"max_iterations": 0})
        ordinary.result()
        finished = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, address=address)
    cases = [
        (ordinary.id, grpc.StatusCode.INVALID_ARGUMENT, "the id of an Optimize run"),
        (finished.run_id, grpc.StatusCode.FAILED_PRECONDITION, "is FINISHED, not INTERRUPTED"),
        ("r-none", grpc.StatusCode.NOT_FOUND, "run with id 'r-none'"),
    ]
    for run_id, code, says in cases:
        refused = Stream(address, service_pb2.OptimizeRequest(resume_run_id=run_id)).refusal()
        assert refused.code() == code, refused.details()
        assert refused.details().startswith("resume_run_id: ")
        assert says in refused.details()


def test_waiting_resumes_hold_no_thread(handle, monkeypatch):
    """More waiting resumes than the server has RPC threads: other calls are still served
    while every one of them waits, and the run is resumed once its old stream lets go."""
    address = handle.address
    owner, run_id = _attached_optimize(address)
    checked = []
    real = Optimizer._resumable
    monkeypatch.setattr(Optimizer, "_resumable", lambda *a: checked.append(1) or real(*a))
    waiting = [
        Stream(address, service_pb2.OptimizeRequest(resume_run_id=run_id)) for _ in range(12)
    ]
    try:
        assert wait_until(lambda: len(checked) >= 12, GUARD)  # all 12 are waiting now
        with Client(address, timeout=GUARD) as client:
            for _ in range(3):  # every RPC thread would be held by a waiting resume
                assert client.get_run(run_id).status == "RUNNING"
                assert len(list(client.list_runs())) >= 1
        for stream in waiting[1:]:
            stream.close()
        owner.close()  # the old stream lets go: the one resume left takes the run over
        assert waiting[0].read().started.run_id == run_id
    finally:
        for stream in waiting:
            stream.close()
        owner.close()


@pytest.mark.parametrize("first, got", [
    ([], "an empty stream"),
    ([service_pb2.OptimizeRequest()], "a first request with neither"),
    ([service_pb2.OptimizeRequest(stop=True)], "a first request with stop"),
])  # fmt: skip
def test_a_stream_that_starts_nothing_is_refused_saying_what_came(handle, first, got):
    """Before, an empty stream ended OK with no response at all, and a first request with
    neither start nor resume_run_id was refused without saying what it had."""
    with grpc.insecure_channel(handle.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Optimize(iter(first), timeout=GUARD))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (
        f"start: expected start or resume_run_id in the first request, got {got}"
    )


def test_a_resume_that_loses_to_a_cancel_names_resume_run_id(handle, monkeypatch):
    """The run checked INTERRUPTED, then cancelled before the resume's conditional update:
    the refusal named `run_id`, which OptimizeRequest does not have."""
    start = service_pb2.OptimizeStart(
        initial_params=tensors.encode(X0), capabilities=service_pb2.Capabilities(gradient=True)
    )
    stream = Stream(handle.address, service_pb2.OptimizeRequest(start=start))
    run_id = stream.read().started.run_id
    stream.close()  # the caller goes away: INTERRUPTED
    with Client(handle.address, timeout=GUARD) as client:
        assert wait_until(lambda: client.get_run(run_id).status == "INTERRUPTED", GUARD)
    real = RunManager.resume

    def cancelled_first(self, row, objective):
        assert self.cancel_interrupted(row)  # a CancelRun lands just before the resume
        return real(self, row, objective)

    monkeypatch.setattr(RunManager, "resume", cancelled_first)
    refused = Stream(handle.address, service_pb2.OptimizeRequest(resume_run_id=run_id)).refusal()
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details() == f"resume_run_id: run {run_id} is CANCELLED, not INTERRUPTED"


def _cancel_early(address: str, first: service_pb2.OptimizeRequest, delay: float) -> None:
    """Open Optimize with `first` and cancel the call `delay` seconds later (maybe before
    the server has read it, maybe while it admits the run)."""
    stream = Stream(address, first)
    time.sleep(delay)
    stream.close()


def test_a_stream_cancelled_while_its_run_is_admitted_leaves_no_run_waiting(handle):
    """A caller that cancels Optimize just after its first message: the run was admitted
    on a thread after the handler was cancelled, with no stream left to answer its asks, so
    it stayed RUNNING (holding a --max-optimize-runs slot, ignoring CancelRun, delaying
    shutdown) until the evaluation deadline. Every run so made, started or resumed, is now
    INTERRUPTED at once."""
    address = handle.address
    delays = [0.0, 0.001, 0.002, 0.005, 0.01, 0.02] * 2
    with Client(address, timeout=GUARD) as client:
        before = {run.run_id for run in client.list_runs()}
        start = service_pb2.OptimizeStart(
            initial_params=tensors.encode(X0),
            capabilities=service_pb2.Capabilities(gradient=True, hessian=True),
        )
        for delay in delays:
            _cancel_early(address, service_pb2.OptimizeRequest(start=start), delay)
        made = [run.run_id for run in client.list_runs() if run.run_id not in before]
        assert made, "no run was admitted: the cancels came before every start"

        def settled() -> bool:
            return all(client.get_run(run_id).status != "RUNNING" for run_id in made)

        assert wait_until(settled, timeout=10)
        for run_id in made:
            assert client.get_run(run_id).status == "INTERRUPTED"
        for delay, run_id in zip(delays, made, strict=False):
            _cancel_early(address, service_pb2.OptimizeRequest(resume_run_id=run_id), delay)
        assert wait_until(settled, timeout=10)
