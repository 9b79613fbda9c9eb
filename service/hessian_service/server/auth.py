"""Bearer-token authentication: a server interceptor and the caller identity of a call.

Every RPC except grpc.health.v1 needs `authorization: Bearer <token>` with a token from
the --auth-token-file (one per line, surrounding whitespace ignored; blank lines and lines
starting with `#` ignored; a line with whitespace inside is refused at start). Server
reflection is protected too: it describes the API, which is for authenticated callers.
A token is looked up by its SHA-256 digest in a set of the configured ones' digests: one
hash and one lookup whatever the number of tokens, and the time taken does not depend on
how much of a guess was right (a guess's digest shares nothing with the token's).

Tenants: what a call creates (runs, problems) belongs to its tenant, the identity of its
token; tokens from --admin-token-file are admins, who see every tenant's. A server without
tokens has one tenant, the anonymous one, whatever token a call sends.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ..store import ANONYMOUS_OWNER
from .errors import refusal

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
ANONYMOUS = ANONYMOUS_OWNER


def load_tokens(path: str, flag: str = "--auth-token-file") -> list[bytes]:
    """The tokens in `path`, one per line; ValueError naming the flag and the line when a
    line is not one token, or when there are none."""
    try:
        # bytes decoded, not read_text: its universal newlines made a bare CR a line end
        text = pathlib.Path(path).read_bytes().decode("utf-8-sig")  # a leading BOM dropped
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc})") from None
    except UnicodeDecodeError as exc:
        reason = f"{exc.reason} at byte {exc.start}"
        raise ValueError(f"{flag} {path}: not UTF-8 text ({reason})") from None
    tokens = []
    # lines end at \n only (str.splitlines also splits at \v, \f, U+2028...: a token with
    # one inside became two), and only ASCII blanks are trimmed
    for number, line in enumerate(text.split("\n"), 1):
        token = line.strip(" \t\r")
        if not token or token.startswith("#"):
            continue
        if len(token.split()) > 1:  # a comment after a token, or two tokens on a line
            raise ValueError(
                f"{flag} {path}: line {number} holds more than a token (whitespace inside; "
                "put comments on lines of their own, starting with #)"
            )
        if not (token.isascii() and token.isprintable()):  # gRPC metadata values are ASCII
            raise ValueError(
                f"{flag} {path}: line {number} is not printable ASCII (no client could send "
                "it as a bearer token)"
            )
        tokens.append(token.encode())
    if not tokens:
        raise ValueError(f"{flag} {path}: no tokens in it (one per line)")
    return tokens


class TokenSet:
    """Configured tokens, held as their SHA-256 digests: membership is one hash and one set
    lookup, not a comparison with each of them (300,000 tokens took 19 ms a call, on the
    event loop, refused calls included)."""

    def __init__(self, tokens: Sequence[bytes]) -> None:
        self._digests = frozenset(hashlib.sha256(t).digest() for t in tokens)

    def __contains__(self, token: bytes | None) -> bool:
        return token is not None and hashlib.sha256(token).digest() in self._digests


def bearer_token(metadata: Any) -> bytes | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode()
    return None


def caller(context: grpc.ServicerContext) -> str:
    """A stable, non-secret identity of the call's token (for logs; tenants: Tenancy)."""
    token = bearer_token(context.invocation_metadata())
    if token is None:
        return ANONYMOUS
    return "token:" + hashlib.sha256(token).hexdigest()[:16]


@dataclass(frozen=True)
class Tenant:
    """Who a call acts for: `name` owns what the call creates; an admin sees every tenant's."""

    name: str
    admin: bool = False

    @property
    def scope(self) -> str | None:
        """The owner whose runs and problems the call may use (None: everyone's)."""
        return None if self.admin else self.name


class Tenancy:
    """The tenant of a call: its token's identity on a server that checks tokens, else the
    one anonymous tenant (on an open server a made-up token is no identity, nor a quota)."""

    def __init__(self, authenticated: bool, admin_tokens: Sequence[bytes] = ()) -> None:
        if admin_tokens and not authenticated:
            raise ValueError("--admin-token-file needs --auth-token-file")
        self.authenticated = authenticated
        self._admin_tokens = TokenSet(admin_tokens)

    def of(self, context: grpc.ServicerContext) -> Tenant:
        """The calling tenant (the interceptor has already refused unknown tokens)."""
        if not self.authenticated:
            return Tenant(ANONYMOUS)
        token = bearer_token(context.invocation_metadata())
        return Tenant(caller(context), token in self._admin_tokens)


class TokenCheck:
    """Refuses, with UNAUTHENTICATED, every call but health without a configured token.

    The server's one interceptor (observability.CallInterceptor) applies it when the call
    arrives, before its body is read and decoded.
    """

    def __init__(self, tokens: list[bytes]) -> None:
        if not tokens:
            raise ValueError("TokenCheck needs at least one token")
        self._tokens = TokenSet(tokens)

    def allowed(self, token: bytes | None) -> bool:
        """Whether `token` is one of the configured tokens."""
        return token in self._tokens

    def admit(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """`handler` itself for an allowed call (or health), else one that refuses it."""
        if details.method.startswith(OPEN_PREFIXES):
            return handler
        token = bearer_token(details.invocation_metadata)
        if self.allowed(token):
            return handler
        why = "no bearer token" if token is None else "the bearer token is not valid"
        return refusal(
            handler,
            f"authorization: {why}; send metadata 'authorization: Bearer <token>' with a token "
            "from the server's --auth-token-file",
        )
