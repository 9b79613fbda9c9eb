"""sync_bridge on a real grpc.aio server: a synchronous handler run on the pool sees the sync
ServicerContext API with its usual meaning. is_active() turns False and add_callback callbacks
run when the client cancels the call while the handler still works (grpc.aio's own sync
context has no is_active and runs callbacks only after a normal return); abort from the pool
thread ends the call with its code; a normal answer runs the callbacks too."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hessian_service.server.app import EventLoopThread
from hessian_service.server.sync_bridge import asyncify

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
SERVING = health_pb2.HealthCheckResponse.SERVING


class Probe(health_pb2_grpc.HealthServicer):
    """Check is sync (bridged); what it observed of its context is kept per call mode."""

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}
        self.ended: dict[str, threading.Event] = {}
        self.working = threading.Event()  # the "outlive" call is inside its handler

    def Check(self, request, context):
        mode = request.service
        seen = self.seen[mode] = {"active": context.is_active()}
        seen["remaining"] = context.time_remaining()
        ended = self.ended[mode] = threading.Event()
        seen["registered"] = context.add_callback(ended.set)
        if mode == "abort":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the probe refuses")
        if mode == "outlive":
            self.working.set()
            give_up = time.monotonic() + 30  # a bound against a hang, not a timing claim
            while context.is_active() and time.monotonic() < give_up:
                time.sleep(0.01)
            seen["active_after"] = context.is_active()
            seen["callback_ran"] = ended.is_set()
            seen["late_registered"] = context.add_callback(lambda: None)
        return health_pb2.HealthCheckResponse(status=SERVING)

    async def Watch(self, request, context):
        yield health_pb2.HealthCheckResponse(status=SERVING)


@pytest.fixture(scope="module")
def bridged():
    probe = Probe()
    events = EventLoopThread(ThreadPoolExecutor(2, thread_name_prefix="bridge-test"))

    async def serve():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(asyncify(probe, HEALTH), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = events.run(serve())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield probe, health_pb2_grpc.HealthStub(channel)
    events.run(server.stop(1.0))
    events.close()


def test_a_client_cancel_ends_the_call_for_a_handler_still_working(bridged):
    probe, stub = bridged
    call = stub.Check.future(health_pb2.HealthCheckRequest(service="outlive"), timeout=60)
    assert probe.working.wait(30)
    call.cancel()
    assert probe.ended["outlive"].wait(30), "the callback did not run when the call ended"
    seen = probe.seen["outlive"]
    deadline = time.monotonic() + 30
    while "late_registered" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen["active"] is True and seen["registered"] is True
    assert seen["remaining"] is not None and seen["remaining"] > 0
    assert seen["active_after"] is False and seen["callback_ran"] is True
    assert seen["late_registered"] is False  # the call had ended: nothing left to call back


def test_abort_from_the_pool_thread_ends_the_call_with_its_code(bridged):
    probe, stub = bridged
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="abort"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "the probe refuses"
    assert probe.ended["abort"].wait(30)


def test_a_normal_answer_runs_the_callbacks(bridged):
    probe, stub = bridged
    reply = stub.Check(health_pb2.HealthCheckRequest(service="plain"), timeout=30)
    assert reply.status == SERVING
    assert probe.ended["plain"].wait(30)
    assert probe.seen["plain"]["remaining"] is not None  # the call had a deadline
    assert probe.seen["plain"]["active"] is True


def test_a_sync_streaming_handler_is_refused():
    class SyncWatch(Probe):
        def Watch(self, request, context):
            yield health_pb2.HealthCheckResponse(status=SERVING)

    with pytest.raises(TypeError, match=r"grpc\.health\.v1\.Health\.Watch: a streaming handler"):
        asyncify(SyncWatch(), HEALTH)
