"""A raw Optimize stream for the service tests: each test drives every message itself."""

from __future__ import annotations

import queue

import grpc
import pytest
from hessian_client.proto import service_pb2, service_pb2_grpc

HANG_GUARD = 120  # seconds any one stream may take here


class Stream:
    """A raw Optimize stream: send requests, read responses (a test drives each message)."""

    def __init__(self, address: str, first: service_pb2.OptimizeRequest) -> None:
        self.channel = grpc.insecure_channel(address)
        self.outgoing: queue.Queue = queue.Queue()
        self.outgoing.put(first)
        stub = service_pb2_grpc.HessianServiceStub(self.channel)
        self.call = stub.Optimize(iter(self.outgoing.get, None), timeout=HANG_GUARD)

    def read(self) -> service_pb2.OptimizeResponse:
        return next(self.call)

    def send(self, **kind) -> None:
        self.outgoing.put(service_pb2.OptimizeRequest(**kind))

    def finish(self) -> service_pb2.RunInfo:
        """Read to the last response; the run's final state."""
        for response in self.call:
            if response.WhichOneof("kind") == "finished":
                return response.finished
        raise AssertionError("the stream ended without a finished response")

    def refusal(self) -> grpc.RpcError:
        """The error the first read raises (the server refused the stream); closes it."""
        try:
            with pytest.raises(grpc.RpcError) as err:
                self.read()
        finally:
            self.close()
        return err.value

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()
        self.channel.close()
