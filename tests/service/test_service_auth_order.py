"""Authentication comes before decoding: garbage bytes sent without a valid token get
UNAUTHENTICATED on every RPC (methods read from the service descriptor), never an
INVALID_ARGUMENT that describes our message types; with a valid token the same bytes get
INVALID_ARGUMENT naming the request."""

from __future__ import annotations

import grpc
import pytest
from conftest import start_server
from hessian_client.proto import service_pb2

SERVICE = service_pb2.DESCRIPTOR.services_by_name["HessianService"]
TOKEN = "order-token-1"
GARBAGE = b"\xff\xff\xff\xff\x0f"  # a truncated varint tag: no message type decodes it
METHODS = [m.name for m in SERVICE.methods]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth-order")
    (tmp / "tokens").write_text(f"{TOKEN}\n")
    handle = start_server(tmp / "data", auth_token_file=str(tmp / "tokens"))
    yield handle
    handle.stop(grace=1.0)


def _raw_call(address: str, name: str, metadata) -> grpc.RpcError:
    """Send GARBAGE as `name`'s request body with identity (de)serializers; the error."""
    method = SERVICE.methods_by_name[name]
    path = f"/{SERVICE.full_name}/{name}"
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        if method.server_streaming:
            for _ in channel.unary_stream(path)(GARBAGE, metadata=metadata, timeout=10):
                pass
        else:
            channel.unary_unary(path)(GARBAGE, metadata=metadata, timeout=10)
    return caught.value


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(
    "metadata", [None, (("authorization", "Bearer not-the-token"),)], ids=["none", "bad"]
)
def test_garbage_without_a_valid_token_is_unauthenticated(secured, name, metadata):
    error = _raw_call(secured.address, name, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert "hessian.v1" not in error.details() and "message" not in error.details()


@pytest.mark.parametrize("name", METHODS)
def test_garbage_with_a_valid_token_is_invalid_argument(secured, name):
    error = _raw_call(secured.address, name, (("authorization", f"Bearer {TOKEN}"),))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    expected = SERVICE.methods_by_name[name].input_type.full_name
    assert error.details().startswith(f"request: not a valid {expected} message")
