"""Exceptions -> gRPC status codes. INTERNAL only ever means a bug in this project."""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..engine.cancel import DEADLINE, Cancelled
from ..engine.errors import ResourceLimitError, UnavailableError, ValidationError, clip
from ..store import (
    ProblemInUseError,
    ProblemNotFoundError,
    RunConflictError,
    RunNotFoundError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
)
from ..store.sqlite import CORRUPT_CODES

log = logging.getLogger(__name__)
MAX_MESSAGE = 1024  # characters of a status message: the rest of a long echo is cut


class NotFoundError(Exception):
    """A named thing (problem id, run id) does not exist."""

    def __init__(self, field: str, what: str) -> None:
        self.field = field
        super().__init__(f"{field}: no {clip(what)}")


def require_id(field: str, value: str, source: str) -> str:
    """`value`, an id a request names; an empty one is INVALID_ARGUMENT (a request that
    forgot it), not NOT_FOUND. `source`: what gives out such ids, for the message."""
    if not value:
        raise ValidationError(field, f"an id (as {source} returned it)", "an empty string")
    if "\x00" in value:  # no id has one, and PostgreSQL's text refuses it (was UNAVAILABLE)
        raise ValidationError(field, f"an id (as {source} returned it)", "a NUL character in it")
    return value


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


class DataLossError(Exception):
    """Stored data a request needs is gone (rows removed behind the server's back)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message (at most MAX_MESSAGE characters) for an exception."""
    code, message = _status_for(exc)
    return code, clip(message, MAX_MESSAGE)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (ResourceLimitError, LimitError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (UnavailableError, ConflictError, RunConflictError, ProblemInUseError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (NotFoundError, RunNotFoundError, ProblemNotFoundError)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, DeadlineError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, Cancelled):  # the engine stopped work for an expired or abandoned call
        if exc.reason == DEADLINE:
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, StoreFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DataLossError):
        return grpc.StatusCode.DATA_LOSS, str(exc)
    if isinstance(exc, StoreCorruptError):
        return grpc.StatusCode.DATA_LOSS, str(exc)
    if isinstance(exc, sqlite3.Error):  # a store read not wrapped in StoreError
        damaged = getattr(exc, "sqlite_errorname", "").startswith(CORRUPT_CODES)
        if damaged or "malformed" in str(exc):
            return grpc.StatusCode.DATA_LOSS, f"the run store is damaged: {exc}"
        return grpc.StatusCode.UNAVAILABLE, f"the run store failed: {exc}"
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
        expected = clip(str(getattr(exc, "expected", None) or message.removeprefix(prefix)))
        field = clip(field)
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


def _ending(context: Any, exc: BaseException) -> tuple[grpc.StatusCode, str, tuple]:
    """(code, details, trailing metadata) ending a call with `exc`'s rich status, keeping
    trailing metadata already set (the x-request-id echo), which the status would replace."""
    status = rich_status(exc)
    kept = tuple(context.trailing_metadata() or ())
    return status.code, status.details, kept + tuple(status.trailing_metadata)


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End a sync handler's call with `exc`'s rich status (raises)."""
    context.abort(*_ending(context, exc))


async def abort_async(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End an async handler's call with `exc`'s rich status (raises)."""
    await context.abort(*_ending(context, exc))


def unary(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary handler: known exceptions become their status codes."""

    @functools.wraps(method)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the handler ended the call itself
        except Exception as exc:
            abort(context, exc)

    return handler


def streaming(method: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Wrap an async server-streaming handler (grpc.aio) the same way."""

    @functools.wraps(method)
    async def handler(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_async(context, exc)

    return handler


def refusal(
    handler: grpc.RpcMethodHandler,
    message: str,
    code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `code` with `message`.

    It has no request deserializer: the body of a refused call is never decoded (so garbage
    without a token gets UNAUTHENTICATED, not a description of our message types). And it
    takes its request as a stream it never reads, whatever the method's kind (the wire is
    the same): a unary handler is only called once the whole body has arrived, so a caller
    with no token could make the server receive and hold --max-message-bytes a call.
    """

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def deny_stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await deny(None, context)
        yield  # pragma: no cover (abort raised)

    kind: dict[str, Callable[..., Any]]
    if handler.response_streaming:
        kind = {"stream_stream": deny_stream, "request_streaming": True}
    else:
        kind = {"stream_unary": deny, "request_streaming": True}
    base = {
        "unary_unary": None,
        "unary_stream": None,
        "stream_unary": None,
        "stream_stream": None,
        "request_deserializer": None,
    }
    return handler._replace(**{**base, **kind})
