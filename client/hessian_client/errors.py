"""One exception hierarchy for everything the SDK raises: server statuses and client-side checks.

Each error carries the gRPC status code, the server's message and, when the server named them
(google.rpc BadRequest field violations in the status details), `.field` and `.expected`.
"""

from __future__ import annotations

from typing import Any

import grpc


class HessianError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `message` the text, `field`/`expected`
    name the offending input when known ("" otherwise)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    from_server = False  # True: the server's status; False: the SDK's own check

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode | None = None,
        *,
        field: str = "",
        expected: str = "",
    ) -> None:
        if code is not None:
            self.code = code
        self.message = message
        self.field = field
        self.expected = expected
        super().__init__(f"{self.code.name}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as built (message and code, then its attributes): the default rebuilt it
        from its formatted text, prefixing the code twice."""
        return type(self), (self.message, self.code), self.__dict__


class InvalidArgument(HessianError, ValueError):
    """Bad input (the server's verdict, or the SDK's own check before sending)."""

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


class DeadlineExceeded(HessianError, TimeoutError):
    """The call's deadline (or a wait()/result() timeout) passed; a TimeoutError too, as
    InvalidArgument is a ValueError (`except TimeoutError` catches it)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(HessianError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class DataLoss(HessianError):
    """Stored data the call needs is gone (e.g. records deleted from a damaged store)."""

    code = grpc.StatusCode.DATA_LOSS


class Unimplemented(HessianError):
    """The server does not offer this call (it speaks an older API than this client)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(HessianError):
    """A bug on the server."""

    code = grpc.StatusCode.INTERNAL


class RunFailed(HessianError):
    """A run ended FAILED before its first record, so it has no records or parameters to
    give: `run_id`, and `info`, its final RunInfo (stop_reason, message)."""

    from_server = True  # the server's verdict on the run, not a mistake in this call
    code = grpc.StatusCode.ABORTED  # no call failed (the run did): gRPC's word for that

    def __init__(self, run_id: str, info: Any) -> None:  # a results.RunInfo (errors is a leaf)
        super().__init__(f"run {run_id} failed before its first record: {info.message}")
        self.run_id = run_id
        self.info = info

    def __reduce__(self) -> tuple[Any, ...]:
        """Copied by its own arguments (not `args`), then its attributes (notes too)."""
        return RunFailed, (self.run_id, self.info), self.__dict__


class IncompatibleServer(HessianError):
    """The server speaks an API major version this client does not (both are named)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    from_server = True  # the server's answer (its API version), not a mistake in the call


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
        Unimplemented,
        Internal,
    )
}


ECHO_LIMIT = 200  # characters of the caller's input a message repeats, as the server's


def invalid(field: str, expected: str, got: object) -> InvalidArgument:
    """A client-side InvalidArgument worded like the server's: `field: expected X, got Y`,
    the echoed input cut to ECHO_LIMIT characters with its full length noted."""
    shown = repr(got)
    if len(shown) > ECHO_LIMIT:
        shown = f"{shown[:ECHO_LIMIT]}... ({len(shown)} characters)"
    return InvalidArgument(
        f"{field}: expected {expected}, got {shown}", field=field, expected=expected
    )


def _field_violation(error: grpc.RpcError) -> tuple[str, str]:
    """(field, expected) from the status's first BadRequest field violation, else ("", "")."""
    from google.rpc import error_details_pb2  # only when a call failed: keeps imports fast
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (AttributeError, ValueError):
        return "", ""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                return violation.field, violation.description
    return "", ""


def from_status(
    code: grpc.StatusCode, message: str, field: str = "", expected: str = ""
) -> HessianError:
    """The typed exception for a server's status (HessianError for codes without a class)."""
    error = _BY_CODE.get(code, HessianError)(
        message or code.name, code, field=field, expected=expected
    )
    error.from_server = True
    return error


def from_rpc_error(error: grpc.RpcError) -> HessianError:
    """The typed exception for a grpc.RpcError (sync or aio), with the field details."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    field, expected = _field_violation(error)
    return from_status(code, details or "", field, expected)
