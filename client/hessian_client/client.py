"""The scripting API: `Client` for unary calls and `Run` for streamed, resumable runs.

Requests are built and answers decoded in `_Api`, shared with `hessian_client.aio.Client`;
the two differ only in how a call is made. Retries of idempotent calls come from the
channel's gRPC service config, not from loops here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import ssl
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import grpc.experimental
import numpy as np

from . import tensors
from ._version import API_VERSION, __version__
from .curvature import from_wire, spectrum_options
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    HessianError,
    IncompatibleServer,
    ResourceExhausted,
    RunFailed,
    from_rpc_error,
    invalid,
)
from .options import method_options, stop_criteria
from .proto import optimize_pb2, problem_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from .results import (
    FINAL_STATUSES,
    HessianResult,
    Method,
    RunInfo,
    RunResult,
    RunStatus,
    ServerInfo,
    StepRecord,
    StepResult,
    WireRunInfo,
    _label,
    server_info,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024**2
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's limits are C ints (the server's flag has the same range)
CLIENT_VERSION_KEY = "x-hessian-client-version"
SERVICE = "hessian.v1.HessianService"
IDEMPOTENT = ("GetRun", "ListRuns", "GetServerInfo", "CreateProblem")
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
_DEFAULT: Any = object()
_DTYPES = {"float32": tensor_pb2.DTYPE_FLOAT32, "float64": tensor_pb2.DTYPE_FLOAT64}
DISTRIBUTIONS = [
    k.removeprefix("DISTRIBUTION_").lower() for k in optimize_pb2.Distribution.keys()[1:]
]
STATUSES = [s.value for s in RunStatus]
# a draw with no objective: "objective_default" names the objective's own init
SAMPLE_DISTRIBUTIONS = [d for d in DISTRIBUTIONS if d != "objective_default"]


class VersionWarning(UserWarning):
    """Client and server speak different minor API versions (both are named)."""


def _api_tuple(version: str) -> tuple[int, ...]:
    """The API version as integers ("1.10" -> (1, 10)), so that 1.10 sorts after 1.9."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


UINT64_MAX = 2**64 - 1


def _number(value: Any, kind: type) -> bool:
    """Whether `value` is a number of `kind` (numbers.Integral or Real; numpy's scalars
    included, a bool not)."""
    return isinstance(value, kind) and not isinstance(value, bool | np.bool_)


def _integer(field: str, value: Any, low: int, high: int) -> int:
    """`value` as an int in [low, high]; InvalidArgument naming `field` otherwise."""
    if not _number(value, numbers.Integral) or not low <= value <= high:
        raise invalid(field, f"an integer in [{low}, {high}]", value)
    return int(value)


def _text(field: str, value: Any, unset: str | None = None) -> str:
    """`value` if it is a str (None: `unset`, where the field may be left unset);
    InvalidArgument naming `field` otherwise."""
    if value is None and unset is not None:
        return unset
    if not isinstance(value, str):
        raise invalid(field, "a string", type(value).__name__)
    if not _utf8(value):
        raise invalid(field, "text that encodes as UTF-8", value)
    return value


def _mapping(field: str, value: Any) -> Mapping[str, Any]:
    """`value` as keyword arguments (None: none); InvalidArgument naming `field` otherwise
    (a list of pairs raised a bare TypeError from `**`)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise invalid(field, "a dict of name: value", type(value).__name__)
    return value


def _utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8: a lone surrogate (what Python makes of a command-line
    argument that is not UTF-8) cannot go on the wire, and protobuf raised a bare
    UnicodeEncodeError where the field should have been named."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _seconds(field: str, value: Any) -> float | None:
    """A timeout: None (no deadline) or seconds in (0, MAX_TIMEOUT_SECONDS] (past about
    1e9 gRPC's deadline overflows and every call fails at once with DEADLINE_EXCEEDED)."""
    if value is None:
        return None
    if not _number(value, numbers.Real) or not 0 < value <= MAX_TIMEOUT_SECONDS:
        raise invalid(
            field,
            f"a number of seconds in (0, {MAX_TIMEOUT_SECONDS:,}] (a year), or None for no "
            "deadline",
            value,
        )
    return float(value)


def _bearer(token: Any) -> tuple[tuple[str, str], ...]:
    """The authorization metadata of `token`, its surrounding whitespace dropped (as the
    server reads its token file); refused unless it is printable ASCII (gRPC's metadata),
    without echoing it."""
    if token is None or token == "":
        return ()
    token = _text("token", token).strip()
    if not token or not all(" " <= c <= "~" for c in token):
        raise invalid("token", "printable ASCII (a bearer token)", f"{len(token)} characters")
    return (("authorization", f"Bearer {token}"),)


def check_versions(info: service_pb2.ServerInfo) -> None:
    """Warn when the server's API minor differs from this client's; raise when the major does."""
    server_api = info.api_version or "1.0"  # servers before the handshake spoke 1.0
    if server_api == API_VERSION:
        return
    who = f"hessian-client {__version__} speaks API {API_VERSION}"
    server = f"hessian-server {info.version} speaks API {server_api}"
    theirs, ours = _api_tuple(server_api), _api_tuple(API_VERSION)
    if theirs[0] != ours[0]:
        raise IncompatibleServer(f"{who}, {server}: upgrade the older of the two")
    if theirs < ours:
        hint = "calls added since will fail UNIMPLEMENTED (e.g. Predict)"
    else:
        hint = "upgrade hessian-client for the calls added since"
    warnings.warn(f"{who}, {server}: {hint}", VersionWarning, stacklevel=3)


def _source(problem: Any) -> dict[str, Any]:
    if isinstance(problem, str):
        return {"problem_id": _text("problem_id", problem)}
    if isinstance(problem, problem_pb2.Problem):
        return {"problem": problem}
    raise invalid("problem", "a Problem message or a problem id string", type(problem).__name__)


def _encode(value: Any, field: str) -> tensor_pb2.Tensor:
    return tensors.encode(value, field=field)


def _params(value: Any, field: str = "params") -> tensor_pb2.Tensor:
    """Parameters as sent: real numbers, so integers and bools (a list like [0, 0]) are sent
    as float64 (the server refuses an integer dtype)."""
    try:
        array = tensors.as_numpy(value)  # once: encode takes the array as it is
    except (TypeError, ValueError):  # not an array: refused by encode, naming the field
        return tensors.encode(value, field=field)
    integral = array.dtype.kind in "biu"
    return tensors.encode(array, dtype=np.float64 if integral else None, field=field)


def _distribution(name: str, field: str, choices: Sequence[str] = DISTRIBUTIONS) -> int:
    if not isinstance(name, str) or name.lower() not in choices:
        raise invalid(field, f"one of {list(choices)}", name)
    return optimize_pb2.Distribution.Value("DISTRIBUTION_" + name.upper())


# several replicas: spread calls round robin over every address, and leave out the ones
# whose grpc.health.v1 status is not SERVING (a draining replica)
BALANCED_SERVICE_CONFIG = json.dumps(
    {
        **json.loads(SERVICE_CONFIG),
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
)


# gRPC target schemes whose syntax is gRPC's to check (anything with "://" is one too)
MAX_TIMEOUT_SECONDS = 365 * 24 * 3600
RESOLVER_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")


def channel_target(address: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC target for `address` and whether it may name several replicas.

    `address` is host:port, a resolver target such as dns:///name:port (every address the
    name resolves to), or a list of IP:port (round robin over them).
    """
    if not isinstance(address, str):
        if isinstance(address, bytes) or not isinstance(address, Iterable):  # Client(50051)
            raise invalid("address", "host:port (a string) or a list of IP:port", address)
        entries = list(address)
        if not entries:
            raise invalid("address", "at least one IP:port", "an empty list")
        for entry in entries:
            _check_port(entry)
        if len(entries) == 1:
            return entries[0], False
        hosts = [e.rsplit(":", 1)[0] for e in entries]
        if all(h.startswith("[") for h in hosts):
            return "ipv6:" + ",".join(entries), True
        if all(h.replace(".", "").isdigit() for h in hosts):
            return "ipv4:" + ",".join(entries), True
        shown = ", ".join(entries)
        raise invalid("address", "IP:port entries (for a name: dns:///name:port)", shown)
    _check_port(address)
    return address, address.startswith("dns:") or address.startswith(("ipv4:", "ipv6:"))


def _check_port(address: str) -> None:
    """Refuse a host:port `address` that gRPC would dial other than as meant."""
    problem = address_problem(address) if isinstance(address, str) else "host:port (a string)"
    if problem is not None:
        raise invalid("address", problem, address)


def address_problem(address: str) -> str | None:
    """What a host:port `address` should be, or None where it is one (resolver targets,
    scheme:..., are gRPC's to parse): a host without a port would be dialled at 443, and a
    port past 65535 wrapped round (99999 to 34463)."""
    if not _utf8(address):
        return "text that encodes as UTF-8"
    if "://" in address or address.split(":", 1)[0] in RESOLVER_SCHEMES:
        return None
    if ":" not in address or address.endswith("]"):
        return "host:port (no port given: gRPC would dial 443)"
    port = address.rsplit(":", 1)[1]
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        return "host:port with a port in 1..65535"
    return None


def _largest_part(message: Any) -> str:
    """The dotted path of the singular message field holding most of `message`'s bytes, or
    the name of a top-level field of another kind that does (a long run name); "request"
    where no field holds most of them."""
    path = []
    while True:
        parts = [(_value_bytes(f, v), f, v) for f, v in message.ListFields()]
        size, fd, inner = max(parts, key=lambda part: part[0], default=(0, None, None))
        if fd is None or 2 * size < message.ByteSize():  # no one field holds most of it
            return ".".join(path) or "request"
        if fd.message_type is None or fd.is_repeated:  # a string, bytes, list or map
            return ".".join(path) or fd.name
        path.append(fd.name)
        message = inner


def _value_bytes(fd: Any, value: Any) -> int:
    """About the bytes a field's value takes on the wire (its payload)."""
    if not fd.is_repeated:
        value = [value]
    elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value = list(value.values())
    return sum(_payload_bytes(v) for v in value)


def _payload_bytes(value: Any) -> int:
    """One value's payload: a message's size, a string's UTF-8 or bytes' length, else 8."""
    if hasattr(value, "ByteSize"):
        return value.ByteSize()
    if isinstance(value, str):
        return len(value.encode())
    return len(value) if isinstance(value, bytes) else 8


def _too_large(request: Any, limit: int, said: str) -> ResourceExhausted:
    """A request over `limit` bytes, named by its largest part (gRPC's own refusals, "Sent /
    Received message larger than max", name none): "<field>: the request <said>"."""
    field = _largest_part(request)
    return ResourceExhausted(
        f"{field}: the request {said}",
        field=field,
        expected=f"a request of at most {limit:,} bytes",
    )


def check_fits(request: Any, limit: int) -> None:
    """Refuse a request over the channel's message limit before sending it."""
    size = request.ByteSize()
    if size > limit:
        raise _too_large(
            request,
            limit,
            f"would be {size:,} bytes, over the {limit:,} a message may hold (the client's "
            "max_message_bytes; the server's is info().limits.max_message_bytes)",
        )


SERVER_TOO_LARGE = re.compile(r"SERVER: Received message larger than max \((\d+) vs\. (\d+)\)")


def call_error(exc: grpc.RpcError, request: Any) -> HessianError:
    """The typed error of a failed call of `request`. A request over the server's own
    --max-message-bytes (lower than this client's) is refused by gRPC with no field; it is
    named here, as the client's own size check names it."""
    found = SERVER_TOO_LARGE.search(exc.details() or "")
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or found is None:
        return from_rpc_error(exc)
    size, limit = int(found[1]), int(found[2])
    error = _too_large(
        request,
        limit,
        f"is {size:,} bytes, over the server's {limit:,}-byte message limit (its "
        "--max-message-bytes)",
    )
    error.from_server = True
    return error


# While a call is open the channel pings the server this often, and drops the connection
# (the call fails UNAVAILABLE) when a ping is not answered in KEEPALIVE_TIMEOUT_MS: a
# network that holds packets without closing the connection left a stream (minimize's, a
# run's watch) waiting for ever. The server accepts pings this often (app.py); one before
# them allows a ping in 5 minutes, so HESSIAN_KEEPALIVE=0 turns the pings off for it.
KEEPALIVE_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def _keepalive() -> list[tuple[str, Any]]:
    """The keepalive channel options (none with HESSIAN_KEEPALIVE=0)."""
    if os.environ.get("HESSIAN_KEEPALIVE", "1").strip() == "0":
        return []
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # an unanswered ping of any kind (gRPC's own flow-control pings too) waited 60 s
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),  # a quiet stream (a slow fun) is pinged too
    ]


def channel_options(max_message_bytes: int, balanced: bool = False) -> list[tuple[str, Any]]:
    """Message limits, keepalive pings while a call is open, the retry policy of idempotent
    calls and, for several replicas, round robin with health checking (gRPC service
    config)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *_keepalive(),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", BALANCED_SERVICE_CONFIG if balanced else SERVICE_CONFIG),
    ]


class _Api:
    """The calls' requests and answers, shared by the sync and asyncio clients."""

    timeout: float | None
    metadata: tuple[tuple[str, str], ...]

    def _setup(
        self, address: str | Sequence[str] | None, token: str | None, timeout: float | None
    ) -> None:
        address = address or os.environ.get("HESSIAN_ADDRESS") or DEFAULT_ADDRESS
        self.address, self._balanced = channel_target(address)
        self.timeout = _seconds("timeout", timeout)
        self.metadata = ((CLIENT_VERSION_KEY, __version__), *_bearer(token))

    @property
    def stub(self) -> Any:
        """The service's stub; FailedPrecondition once the client is closed (gRPC's own
        error there is a bare ValueError, or grpc.aio's UsageError)."""
        if self._closed:
            raise FailedPrecondition(
                "client: this Client is closed (open a new one)", field="client"
            )
        return self._stub

    def _connect(
        self,
        channels: Any,
        address: str | None,
        token: str | None,
        timeout: float | None,
        max_message_bytes: int,
        root_certificates: bytes | None,
        ca_file: str | os.PathLike[str] | None,
    ) -> None:
        """Open the channel with `channels` (grpc, or grpc.aio): TLS when a CA is named.
        Unset, the token and the CA come from HESSIAN_TOKEN and HESSIAN_CA_FILE, as the
        address from HESSIAN_ADDRESS (so minimize and least_squares reach a secured server)."""
        token = token if token is not None else os.environ.get("HESSIAN_TOKEN") or None
        if ca_file is None and root_certificates is None:
            ca_file = os.environ.get("HESSIAN_CA_FILE") or None
        self._setup(address, token, timeout)
        self.max_message_bytes = _integer(
            "max_message_bytes", max_message_bytes, 1024, MAX_MESSAGE_BYTES
        )
        creds = self._credentials(root_certificates, ca_file)
        options = channel_options(self.max_message_bytes, self._balanced)
        if channels is grpc:
            # a sync stream is read on the caller's thread: no channel thread is started per
            # call (one per job that opens a stream on an idle channel) and no hand-off
            # from it to the reader; the grpc.aio client has no such thread anyway
            options.append((grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1))
        if creds is not None:
            self._channel = channels.secure_channel(self.address, creds, options=options)
        else:
            self._channel = channels.insecure_channel(self.address, options=options)
        self._stub = service_pb2_grpc.HessianServiceStub(self._channel)
        self._closed = False

    @staticmethod
    def _credentials(root_certificates: bytes | None, ca_file: Any) -> Any:
        if ca_file is not None:
            if not isinstance(ca_file, str | bytes | os.PathLike):  # an int is a descriptor
                raise invalid("ca_file", "a path to a PEM file", type(ca_file).__name__)
            try:
                with open(ca_file, "rb") as fh:
                    root_certificates = fh.read()
            except OSError as exc:
                raise invalid(
                    "ca_file", "a readable PEM file", f"{ca_file} ({exc.strerror})"
                ) from None
        if root_certificates is None:
            return None
        field = "ca_file" if ca_file is not None else "root_certificates"
        if not isinstance(root_certificates, bytes):
            raise invalid(field, "PEM CA certificates as bytes", type(root_certificates).__name__)
        try:  # gRPC takes any bytes and fails each call later as UNAVAILABLE (a handshake)
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
                cadata=root_certificates.decode("ascii", "ignore")  # PEM blocks are ASCII
            )
        except (ssl.SSLError, ValueError) as exc:  # ValueError: no certificate data at all
            source = f"{ca_file} " if ca_file is not None else ""
            raise invalid(field, "PEM CA certificates", f"{source}({exc})") from None
        return grpc.ssl_channel_credentials(root_certificates=root_certificates)

    def _deadline(self, timeout: Any) -> float | None:
        return self.timeout if timeout is _DEFAULT else _seconds("timeout", timeout)

    def _unary(self, method: str, request: Any, timeout: Any, decode: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def _run(self, run_id: str, info: WireRunInfo | None, like: Any) -> Any:
        raise NotImplementedError

    def _start_watching(
        self, request: service_pb2.StartRunRequest, like: Any, timeout: Any = _DEFAULT
    ) -> Any:
        raise NotImplementedError

    # unary calls
    def info(self, *, timeout: Any = _DEFAULT) -> ServerInfo:
        """Version, API version, backend and why, devices, limits (checks the API versions)."""

        def decode(info: service_pb2.ServerInfo) -> ServerInfo:
            check_versions(info)
            return server_info(info)

        return self._unary("GetServerInfo", service_pb2.GetServerInfoRequest(), timeout, decode)

    def create_problem(self, problem: problem_pb2.Problem, *, timeout: Any = _DEFAULT) -> Any:
        """Upload a problem once; returns its content-addressed id."""
        if not isinstance(problem, problem_pb2.Problem):
            raise invalid("problem", "a Problem message", type(problem).__name__)
        request = service_pb2.CreateProblemRequest(problem=problem)
        return self._unary("CreateProblem", request, timeout, lambda r: r.problem_id)

    def sample(
        self,
        seed: int,
        shapes: Sequence[Sequence[int]],
        *,
        dtype: str = "float32",
        distribution: str = "uniform",
        timeout: Any = _DEFAULT,
    ) -> Any:
        """Draw tensors in order from the server's torch.Generator seeded with `seed`."""
        if dtype not in _DTYPES:
            raise invalid("dtype", f"one of {list(_DTYPES)}", dtype)
        dist = _distribution(distribution, "distribution", SAMPLE_DISTRIBUTIONS)
        try:
            sizes = [list(s) for s in shapes]
        except TypeError:
            raise invalid("shapes", "a list of shapes (lists of sizes)", shapes) from None
        specs = [
            optimize_pb2.TensorSpec(
                shape=[_integer("shapes", d, 0, 2**63 - 1) for d in s],
                dtype=_DTYPES[dtype],
                distribution=dist,
            )
            for s in sizes
        ]
        seed = _integer("seed", seed, 0, UINT64_MAX)
        request = service_pb2.SampleTensorsRequest(seed=seed, tensors=specs)
        return self._unary(
            "SampleTensors", request, timeout, lambda r: [tensors.decode(t) for t in r.tensors]
        )

    def _step(self, rpc: str, problem: Any, params: Any, timeout: Any, options: dict) -> Any:
        request = service_pb2.StepRequest(
            params=_params(params), options=method_options(**options), **_source(problem)
        )

        def decode(r: service_pb2.StepResponse) -> StepResult:
            return StepResult(
                tensors.like_input(tensors.decode(r.params), params),
                StepRecord.from_wire(r.record),
                _label(Method, optimize_pb2.Method, "METHOD_", r.method),
                r.method_note,
                r,
            )

        return self._unary(rpc, request, timeout, decode)

    def gradient_step(
        self,
        problem: problem_pb2.Problem | str,
        params: Any,
        *,
        learning_rate: float | None = None,
        step_policy: str | None = None,
        timeout: Any = _DEFAULT,
        **options: Any,
    ) -> Any:
        """One gradient-descent step from `params` (numpy array or torch tensor) -> StepResult."""
        options.update(learning_rate=learning_rate, step_policy=step_policy)
        return self._step("GradientStep", problem, params, timeout, options)

    def newton_step(
        self,
        problem: problem_pb2.Problem | str,
        params: Any,
        *,
        method: str | None = None,
        learning_rate: float | None = None,
        damping: float | None = None,
        step_policy: str | None = None,
        curvature: str | None = None,
        backend: str | None = None,
        timeout: Any = _DEFAULT,
        **options: Any,
    ) -> Any:
        """One Newton step from `params` -> StepResult.

        method: newton | saddle_free | newton_cg | gauss_newton_cg | auto (newton if the dense
        Hessian fits dense_budget_bytes, else newton_cg). Further keywords are method options
        (cg_max_iterations, cg_tolerance, cg_forcing, trust_radius, curvature_fraction,
        gradient_fraction, seed, hvp_mode, dense_budget_bytes, ...).
        """
        options.update(
            method=method,
            learning_rate=learning_rate,
            damping=damping,
            step_policy=step_policy,
            curvature=curvature,
            backend=backend,
        )
        return self._step("NewtonStep", problem, params, timeout, options)

    def compute_hessian(
        self,
        problem: problem_pb2.Problem | str,
        params: Any,
        *,
        curvature: str | None = None,
        backend: str | None = None,
        omit_matrix: bool = False,
        timeout: Any = _DEFAULT,
    ) -> Any:
        """The dense curvature matrix at `params` and its spectrum summary -> HessianResult."""
        opts = method_options(curvature=curvature, backend=backend)
        request = service_pb2.ComputeHessianRequest(
            params=_params(params),
            curvature=opts.curvature,
            backend=opts.backend,
            omit_matrix=omit_matrix,
            **_source(problem),
        )
        return self._unary(
            "ComputeHessian", request, timeout, lambda r: HessianResult.from_wire(r, params)
        )

    def analyze_curvature(
        self,
        problem: problem_pb2.Problem | str,
        params: Any,
        *,
        timeout: Any = _DEFAULT,
        **options: Any,
    ) -> Any:
        """Matrix-free curvature at `params`: extreme eigenvalues, trace, density, verdict.

        Keywords are spectrum options (top_k, bottom_k, curvature, trace_samples, seed, ...).
        """
        request = service_pb2.AnalyzeCurvatureRequest(
            params=_params(params),
            options=spectrum_options(**options),
            **_source(problem),
        )
        return self._unary("AnalyzeCurvature", request, timeout, from_wire)

    def predict(
        self,
        problem: problem_pb2.Problem | str,
        params: Any,
        inputs: Any = None,
        *,
        timeout: Any = _DEFAULT,
    ) -> Any:
        """The catalogue model's outputs (linear outputs / logits) at `params`, on `inputs`
        rows shaped like the problem's X (None: its own X); the type `params` was sent as."""
        request = service_pb2.PredictRequest(params=_params(params), **_source(problem))
        if inputs is not None:  # bools as 0/1, as problem data (the wire carries no bool)
            kind = tensors.dtype_of(inputs)
            bools = kind is not None and kind.kind == "b"
            request.inputs.CopyFrom(
                tensors.encode(inputs, dtype=np.int64 if bools else None, field="inputs")
            )
        return self._unary(
            "Predict",
            request,
            timeout,
            lambda r: tensors.like_input(tensors.decode(r.outputs), params),
        )

    # runs
    def start_run(
        self,
        problem: problem_pb2.Problem | str,
        params: Any = None,
        *,
        seed: int | None = None,
        init: str = "objective_default",
        name: str = "",
        stopping: dict[str, Any] | None = None,
        curvature_seed: int | None = None,
        watch: bool = False,
        timeout: Any = _DEFAULT,
        **options: Any,
    ) -> Any:
        """Queue a run from `params` (or from a server-side draw with `seed`) -> Run.

        Keywords are method options (method="auto" picks newton or newton_cg by size, and
        newton_cg when a fraction below 1 asks for sub-sampling; the returned run's
        `info().method_note` says which and why); curvature_seed is the
        Hessian-free sub-samples' seed (curvature rows and gradient mini-batches; method
        option `seed`). The run's final parameters come back in the shape and type of `params`.
        With `watch`, one StartAndWatchRun call starts the run and opens its stream: the
        run's first `stream()` (or `wait`, `records`, `result`) reads that call, one round
        trip fewer than StartRun then WatchRun. The call has the client's timeout as its
        deadline (it bounds the start; a stream still going then continues on WatchRun); a
        `stream` given its own `timeout` cancels it and uses WatchRun. A handle never
        streamed holds its call until the run ends or the handle is dropped. A server
        before API 1.2 (no StartAndWatchRun) gets StartRun, and the stream WatchRun.
        `timeout` (seconds; None: no deadline) replaces the client's timeout for this call.
        """
        request = service_pb2.StartRunRequest(
            options=method_options(seed=curvature_seed, **options),
            stopping=stop_criteria(**_mapping("stopping", stopping)),
            name=_text("name", name, unset=""),
            **_source(problem),
        )
        if params is not None and seed is not None:
            raise invalid("seed", "None when params are given (they are the start)", seed)
        if init != "objective_default" and params is not None:
            raise invalid("init", "objective_default when params are given (they are the "
                          "start; init is a seed draw's distribution)", init)  # fmt: skip
        if init != "objective_default" and seed is None:
            raise invalid("init", "a seed to draw with (init is that draw's distribution)", init)
        if params is not None:
            request.initial_params.CopyFrom(_params(params))
        elif seed is not None:
            dist = _distribution(init, "init")
            seed = _integer("seed", seed, 0, UINT64_MAX)
            request.init.CopyFrom(optimize_pb2.Initializer(seed=seed, distribution=dist))
        if watch:
            return self._start_watching(request, params, timeout)
        return self._unary("StartRun", request, timeout, self._start_decoder(params))

    def _start_decoder(self, like: Any) -> Callable[[Any], Any]:
        """StartRunResponse -> the Run handle (final parameters as the type of `like`)."""
        return lambda info: self._run(info.run_id, info, like)

    def run(self, run_id: str) -> Any:
        """A handle on an existing run (final parameters as numpy)."""
        return self._run(_text("run_id", run_id), None, None)

    def get_run(self, run_id: str, include_params: bool = False, *, timeout: Any = _DEFAULT) -> Any:
        """A run's status, stop reason, last record and (optionally) final parameters."""
        if not isinstance(include_params, (bool, np.bool_)):
            raise invalid("include_params", "True or False", include_params)
        request = service_pb2.GetRunRequest(
            run_id=_text("run_id", run_id), include_params=bool(include_params)
        )
        return self._unary("GetRun", request, timeout, RunInfo.from_wire)

    @staticmethod
    def _list_request(status: str | Sequence[str], page_size: int) -> Any:
        values = []
        if status is None or isinstance(status, str):
            status = () if status is None else (status,)  # none, one name, or several
        elif not isinstance(status, Iterable):
            raise invalid("status", f"a status name or a list of them, from {STATUSES}", status)
        for s in status:
            if not isinstance(s, str) or s.upper() not in STATUSES:
                raise invalid("status", f"one of {STATUSES}", s)
            values.append(service_pb2.RunStatus.Value("RUN_STATUS_" + s.upper()))
        page_size = 0 if page_size is None else _integer("page_size", page_size, 0, 2**31 - 1)
        return service_pb2.ListRunsRequest(page_size=page_size, status=values)

    def cancel_run(self, run_id: str, *, timeout: Any = _DEFAULT) -> Any:
        """Stop a run before its next iteration (its records are kept) -> RunInfo."""
        request = service_pb2.CancelRunRequest(run_id=_text("run_id", run_id))
        return self._unary("CancelRun", request, timeout, RunInfo.from_wire)

    def resume_run(self, run_id: str, *, timeout: Any = _DEFAULT) -> Any:
        """Continue an INTERRUPTED run from its last checkpoint -> Run."""
        request = service_pb2.ResumeRunRequest(run_id=_text("run_id", run_id))
        return self._unary(
            "ResumeRun", request, timeout, lambda info: self._run(run_id, info, None)
        )

    def delete_run(self, run_id: str, *, timeout: Any = _DEFAULT) -> Any:
        """Delete a run that is not executing."""
        request = service_pb2.DeleteRunRequest(run_id=_text("run_id", run_id))
        return self._unary("DeleteRun", request, timeout, lambda r: r.deleted)

    def delete_problem(self, problem_id: str, *, timeout: Any = _DEFAULT) -> Any:
        """Delete a stored problem -> whether it was deleted (FailedPrecondition while a
        queued, running or interrupted run of yours uses it; NotFound if you hold none)."""
        request = service_pb2.DeleteProblemRequest(problem_id=_text("problem_id", problem_id))
        return self._unary("DeleteProblem", request, timeout, lambda r: r.deleted)


class Client(_Api):
    """A connection to a hessian server. `timeout` is the default deadline of unary calls.

    `token` is sent as `authorization: Bearer <token>` on every call. `ca_file` (a PEM file)
    or `root_certificates` (PEM bytes) turn on TLS and name the CA that signed the server's
    certificate. Idempotent calls (GetRun, ListRuns, GetServerInfo, CreateProblem) are
    retried on UNAVAILABLE by gRPC's retry policy. `address` may name several replicas
    (dns:///name:port, or a list of IP:port): calls then go round robin to the healthy ones.
    Streams are read on the thread that iterates them (gRPC's SingleThreadedUnaryStream:
    no channel thread per call), so a stream opened on `stub` directly knows its `code()`
    and `details()` once it has been read to its end.
    """

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        token: str | None = None,
        timeout: float | None = 60.0,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        root_certificates: bytes | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self._connect(grpc, address, token, timeout, max_message_bytes, root_certificates, ca_file)

    def close(self) -> None:
        """Close the channel."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, method: str, request: Any, timeout: Any = _DEFAULT) -> Any:
        """Invoke unary `method`, turning gRPC errors into typed HessianError subclasses."""
        check_fits(request, self.max_message_bytes)
        try:
            return getattr(self.stub, method)(
                request, timeout=self._deadline(timeout), metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise call_error(exc, request) from None

    def _unary(self, method: str, request: Any, timeout: Any, decode: Callable[[Any], Any]) -> Any:
        return decode(self.call(method, request, timeout))

    def _run(self, run_id: str, info: WireRunInfo | None, like: Any) -> Run:
        return Run(self, run_id, RunInfo.from_wire(info) if info is not None else None, like)

    def _start_watching(
        self, request: service_pb2.StartRunRequest, like: Any, timeout: Any = _DEFAULT
    ) -> Run:
        check_fits(request, self.max_message_bytes)
        call = self.stub.StartAndWatchRun(
            request, timeout=self._deadline(timeout), metadata=self.metadata
        )
        try:
            first = next(call, None)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server before API 1.2
                return self._unary("StartRun", request, timeout, self._start_decoder(like))
            raise call_error(exc, request) from None
        return _watched(self._run, call, first, like)

    def list_runs(
        self, status: str | Sequence[str] = (), page_size: int = 50, *, timeout: Any = _DEFAULT
    ) -> Iterator[RunInfo]:
        """Every run, newest first, filtered by a status name or several; pages are fetched
        as needed (`timeout` bounds each page's call). The arguments are checked here, not
        at the first page."""
        return self._pages(self._list_request(status, page_size), timeout)

    def _pages(self, request: Any, timeout: Any) -> Iterator[RunInfo]:
        while True:
            response = self.call("ListRuns", request, timeout)
            yield from (RunInfo.from_wire(r) for r in response.runs)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token


def _watched(make_run: Callable[..., Any], call: Any, first: Any, like: Any) -> Any:
    """The run StartAndWatchRun's first event names, holding the open call for `stream`."""
    if first is None or not first.HasField("started"):
        call.cancel()
        raise HessianError("StartAndWatchRun's first event did not name the run it started")
    run = make_run(first.started.run_id, first.started, like)
    run._opened = call
    return run


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _raise_if_failed_empty(run_id: str, final: RunInfo) -> None:
    """A run that FAILED before its first record has nothing to stream: raise its message."""
    if final.status == RunStatus.FAILED and final.num_records == 0:
        raise RunFailed(run_id, final)


def timed_out(run_id: str, timeout: float | None, status: str) -> DeadlineExceeded:
    """The error wait()/result() raise when their timeout passes (the run keeps going)."""
    return DeadlineExceeded(f"run {run_id} still {status} after {timeout} s (it keeps going)")


class _RunBase:
    """What the sync and asyncio run handles share."""

    def __init__(self, client: Any, run_id: str, info: RunInfo | None = None, like: Any = None):
        self.client = client
        self.id = run_id
        self.final: RunInfo | None = None
        self._info = info
        self._like = like
        self._opened: Any = None  # StartAndWatchRun's call, until a stream() reads it

    def _take_opened(self, timeout: float | None) -> Any:
        """StartAndWatchRun's open call for this stream, once (None: call WatchRun); with a
        `timeout` it is cancelled, since it has no deadline to bound the stream."""
        opened, self._opened = self._opened, None
        if opened is not None and timeout is not None:
            opened.cancel()
            return None
        return opened

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"

    def _result(self, info: RunInfo) -> RunResult:
        """The result of GetRun's final `info`: the final parameters (in `info` too) in the
        shape and type the parameters were sent as, when this handle started the run (else
        as the server sends them: shaped as the objective reads them)."""
        params = info.final_params
        if params is None:
            return RunResult(info, None)
        shape = None if self._like is None else tuple(np.shape(self._like))
        if shape is not None and params.size == math.prod(shape):
            params = params.reshape(shape)
        params = tensors.like_input(params, self._like)
        return RunResult(dataclasses.replace(info, final_params=params), params)

    def _event_records(self, event: Any, nxt: int) -> tuple[list[StepRecord], int]:
        out = []
        for record in event.records:
            if record.iteration >= nxt:
                nxt = record.iteration + 1
                out.append(StepRecord.from_wire(record))
        if event.HasField("final"):
            self.final = RunInfo.from_wire(event.final)  # the last event
        return out, nxt


def _wait_seconds(timeout: Any) -> float | None:
    """A wait's `timeout`: a number of seconds (0 or less is already past: a run that has
    ended still streams its records), or None / inf for no deadline."""
    if timeout is not None and not (_number(timeout, numbers.Real) and not math.isnan(timeout)):
        raise invalid("timeout", "a number of seconds, or None for no deadline", timeout)
    return None if timeout is None or timeout == math.inf else float(timeout)


class _Watch:
    """One `Run.stream`'s progress through WatchRun calls: the next iteration, the deadline,
    the reconnect window and the backoff. The sync and asyncio loops share it and differ
    only in how they call and wait."""

    def __init__(
        self, run: _RunBase, from_iteration: int, reconnect_timeout: float, timeout: float | None
    ) -> None:
        timeout = _wait_seconds(timeout)
        if not (_number(reconnect_timeout, numbers.Real) and reconnect_timeout >= 0):
            # it was taken as given, and a string failed with a bare TypeError at the first
            # reconnect
            raise invalid("reconnect_timeout", "a number of seconds >= 0", reconnect_timeout)
        self.nxt = _integer("from_iteration", from_iteration, 0, 2**63 - 1)
        self.run, self.timeout = run, timeout
        self.reconnect_timeout = float(reconnect_timeout)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.last_progress = time.monotonic()
        self.delay = 0.05

    def remaining(self) -> float | None:
        """Seconds left for the next call (None: no deadline)."""
        return _remaining(self.deadline)

    def expired(self, remaining: float | None) -> bool:
        """Whether the whole stream's `timeout` has passed."""
        return remaining is not None and remaining <= 0

    def overdue(self, status: Any) -> DeadlineExceeded | None:
        """At the deadline: the error to raise while the run is still going, or None (and
        no deadline from now on) when it has ended, whose records are all there to read."""
        if status in FINAL_STATUSES:
            self.deadline = None
            return None
        return timed_out(self.run.id, self.timeout, status)

    def request(self) -> service_pb2.WatchRunRequest:
        """The WatchRun request resuming after the last record seen."""
        return service_pb2.WatchRunRequest(run_id=self.run.id, from_iteration=self.nxt)

    def records(self, event: Any) -> list[StepRecord]:
        """The event's records not yet yielded (new records reset the backoff)."""
        records, self.nxt = self.run._event_records(event, self.nxt)
        if records:
            self.last_progress = time.monotonic()
            self.delay = 0.05
        return records

    def ended(self) -> bool:
        """Whether the run's final state has arrived (a run that failed empty raises)."""
        if self.run.final is None:
            return False
        _raise_if_failed_empty(self.run.id, self.run.final)
        return True

    def timed_out_by(self, exc: grpc.RpcError, opened: bool = False) -> bool:
        """True if `exc` is the stream's own deadline; raise unless it is a dropped
        connection within the reconnect window or the deadline of StartAndWatchRun's call
        (`opened`: it bounds the start; then the caller goes on with WatchRun)."""
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            if self.deadline is not None:
                return True
            if opened:
                return False
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise from_rpc_error(exc) from None
        if time.monotonic() - self.last_progress > self.reconnect_timeout:
            raise from_rpc_error(exc) from None
        return False

    def backoff(self) -> float:
        """The wait before the next call (doubling up to 1 s)."""
        delay, self.delay = self.delay, min(self.delay * 2, 1.0)
        return delay


def records_frame(records: Sequence[StepRecord]) -> Any:
    """The records as a pandas DataFrame, one row per iteration (needs pandas)."""
    try:
        import pandas as pd
    except ImportError:
        raise HessianError("records_frame needs pandas: pip install pandas") from None
    columns = [f for f in StepRecord.__dataclass_fields__ if f != "raw"]
    return pd.DataFrame([[getattr(r, c) for c in columns] for r in records], columns=columns)


class Run(_RunBase):
    """A server-side run: stream its records (resuming after drops), wait, cancel, result."""

    client: Client

    def stream(
        self,
        from_iteration: int = 0,
        *,
        reconnect_timeout: float = 30.0,
        timeout: float | None = None,
    ) -> Iterator[StepRecord]:
        """Every record from `from_iteration` on, exactly once, until the run ends.

        A dropped connection (UNAVAILABLE) is retried with backoff from the last iteration
        seen, for up to `reconnect_timeout` seconds without progress. `timeout` bounds the
        whole stream (DeadlineExceeded), queued or not. `final` holds the run's state
        afterwards. A run that FAILED before its first record raises RunFailed with the
        server's message and the run's final info (there is nothing to yield).
        """
        watch = _Watch(self, from_iteration, reconnect_timeout, timeout)
        opened = self._take_opened(timeout)
        while True:
            remaining = watch.remaining()
            if watch.expired(remaining):
                if late := watch.overdue(self._status()):
                    raise late
                remaining = None
            call, opened = opened, None
            reading_opened = call is not None
            try:
                if call is None:
                    call = self.client.stub.WatchRun(
                        watch.request(), timeout=remaining, metadata=self.client.metadata
                    )
                for event in call:
                    yield from watch.records(event)
                if watch.ended():
                    return
            except grpc.RpcError as exc:
                if watch.timed_out_by(exc, reading_opened) and (
                    late := watch.overdue(self._status())
                ):
                    raise late from None
            finally:  # a consumer that stopped early leaves no WatchRun open on the server
                if call is not None:
                    call.cancel()
            time.sleep(watch.backoff())

    def _status(self) -> str:
        try:
            return self.client.get_run(self.id).status
        except HessianError:
            return "running"

    def wait(self, timeout: float | None = None) -> RunInfo:
        """Block until the run ends and return its final info; DeadlineExceeded after
        `timeout` seconds in any state (the run keeps going)."""
        timeout = _wait_seconds(timeout)  # before the call that finds where to start
        for _ in self.stream(self._next_unseen(), timeout=timeout):
            pass
        assert self.final is not None
        return self.final

    def _next_unseen(self) -> int:
        if self._opened is not None:  # StartAndWatchRun's call streams from the first record
            return 0
        return max(self.client.get_run(self.id).num_records - 1, 0)

    def cancel(self, *, timeout: Any = _DEFAULT) -> RunInfo:
        """Ask the server to stop the run before its next iteration."""
        return self.client.cancel_run(self.id, timeout=timeout)

    def info(self, *, timeout: Any = _DEFAULT) -> RunInfo:
        """The run's current state."""
        return self.client.get_run(self.id, timeout=timeout)

    def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the end (at most `timeout` s), then the final info and parameters (in
        the shape and type they were sent as, when this handle started the run)."""
        self.wait(timeout)
        return self._result(self.client.get_run(self.id, include_params=True))

    def records(self, from_iteration: int = 0) -> list[StepRecord]:
        """Every record from `from_iteration` on (waits for the run to end)."""
        return list(self.stream(from_iteration))

    def records_frame(self, from_iteration: int = 0) -> Any:
        """The run's records as a pandas DataFrame (needs pandas; waits for the end)."""
        return records_frame(self.records(from_iteration))
