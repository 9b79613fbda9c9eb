"""Exceptions -> gRPC status codes. INTERNAL only ever means a bug in this project."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..engine.errors import ResourceLimitError, UnavailableError, ValidationError
from ..store import RunConflictError, RunNotFoundError, StoreError, StoreFullError

log = logging.getLogger(__name__)


class NotFoundError(Exception):
    """A named thing (problem id, run id) does not exist."""

    def __init__(self, field: str, what: str) -> None:
        self.field = field
        super().__init__(f"{field}: no {what}")


class ConflictError(Exception):
    """The request is valid but the resource is in the wrong state for it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class LimitError(Exception):
    """A server limit (queue full, too many runs) refuses the request."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class DeadlineError(Exception):
    """The call's deadline passed before the work began."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an exception raised while serving a call."""
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (ResourceLimitError, LimitError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (UnavailableError, ConflictError, RunConflictError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (NotFoundError, RunNotFoundError)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, DeadlineError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, StoreFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    log.exception("internal error (a bug) while serving a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (a bug): {type(exc).__name__}: {exc}"


def rich_status(exc: BaseException) -> grpc.Status:
    """The status for `exc` with, when it names a field, a google.rpc BadRequest field
    violation (field, and what was expected) in its details, for clients to read typed."""
    code, message = status_for(exc)
    status = status_pb2.Status(code=code_pb2.Code.Value(code.name), message=message)
    field = getattr(exc, "field", "")
    if field:
        prefix = f"{field}: "
        expected = getattr(exc, "expected", None) or message.removeprefix(prefix)
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=expected)
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End the call with `exc`'s rich status, keeping trailing metadata already set (the
    x-request-id echo): abort_with_status alone would replace it."""
    status = rich_status(exc)
    kept = tuple(context.trailing_metadata() or ())
    context.set_trailing_metadata(kept + tuple(status.trailing_metadata))
    context.abort(status.code, status.details)


def unary(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary handler: known exceptions become their status codes."""

    @functools.wraps(method)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            abort(context, exc)

    return handler


def streaming(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """Wrap a server-streaming handler the same way."""

    @functools.wraps(method)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            abort(context, exc)

    return handler
