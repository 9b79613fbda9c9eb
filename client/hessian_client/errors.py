"""Typed exceptions for gRPC failures: each carries the status code and the server's message."""

from __future__ import annotations

import grpc


class HessianError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `message` the server's text."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(f"{self.code.name}: {message}")


class InvalidArgument(HessianError):
    """Bad input; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HessianError):
    """No such problem or run."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(HessianError):
    """A limit: message size, parameter count, dense-Hessian memory, queue full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(HessianError):
    """The request is valid but not now or not here (e.g. native backend unavailable)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(HessianError):
    """Missing or wrong token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(HessianError):
    """The token may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(HessianError):
    """The server could not be reached (or went away)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(HessianError):
    """The call's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(HessianError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class DataLoss(HessianError):
    """Stored data the call needs is gone (e.g. records deleted from a damaged store)."""

    code = grpc.StatusCode.DATA_LOSS


class Internal(HessianError):
    """A bug on the server."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        DataLoss,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> HessianError:
    """The typed exception for a grpc.RpcError (HessianError for codes without a class)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, HessianError)
    return cls(details or code.name, code)
