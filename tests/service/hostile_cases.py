"""Hostile requests for every RPC, built from valid ones by walking the request descriptors.

Each case is (kind, rpc, field path, serialized request). The kinds are issue 11's list:
tensors of too many dimensions, wrong dtypes, shape/byte mismatches, NaN/inf, negative and
huge integers, unknown enum values, huge strings, oversized repeated fields, nested page
tokens, unknown fields and messages over the size limit. Shared by test_hostile_inputs.py and
the mutation fuzz in test_fault_fuzz.py.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hessian_client.proto import optimize_pb2, problem_pb2, service_pb2, tensor_pb2

SERVICE = service_pb2.DESCRIPTOR.services_by_name["HessianService"]
F = FieldDescriptor
HUGE_STRING = "x" * 200_000
OVERSIZED_REPEATED = 100_000
KINDS = (
    "rank",
    "dtype",
    "mismatch",
    "nonfinite",
    "integer",
    "enum",
    "huge_string",
    "repeated",
    "page_token",
    "unknown_fields",
    "oversized_message",
)
INT_LIMITS = {
    F.TYPE_INT32: (-1, -(2**31), 2**31 - 1),
    F.TYPE_INT64: (-1, -(2**63), 2**63 - 1, 2**53 + 1),
    F.TYPE_UINT64: (2**64 - 1, 2**63),
    F.TYPE_UINT32: (2**32 - 1,),
}
FLOATS = (math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324)
Step = tuple[str, Any]  # (field name, index or map key or None)
Case = tuple[str, str, str, bytes]


def _f64(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def tensor(shape: list[int], values: list[float] | None = None) -> tensor_pb2.Tensor:
    """A float64 Tensor (zeros unless `values`)."""
    count = math.prod(shape)
    data = _f64(values if values is not None else [0.0] * count)
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=shape, data=data)


def labels(values: list[int]) -> tensor_pb2.Tensor:
    data = struct.pack(f"<{len(values)}q", *values)
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[len(values)], data=data)


SOFTMAX = problem_pb2.Problem(
    softmax_regression=problem_pb2.SoftmaxRegressionObjective(
        num_classes=3, l2=0.1, fit_intercept=True
    ),
    data={
        "X": tensor([6, 2], [0.1 * i - 0.3 for i in range(12)]),
        "labels": labels([0, 1, 2, 0, 1, 2]),
    },
)
MLP = problem_pb2.Problem(
    mlp=problem_pb2.MlpObjective(layer_sizes=[2, 3, 1], activation="tanh", loss="mse", l2=0.01),
    data={"X": tensor([4, 2], [0.25 * i for i in range(8)]), "y": tensor([4, 1], [1, 0, 1, 0])},
)
SOFTMAX_PARAMS = 9  # (2 features + intercept) x 3 classes
MLP_PARAMS = 13  # 2x3 + 3 + 3x1 + 1


def method_options() -> optimize_pb2.MethodOptions:
    """Valid options with every field set (a line-search Newton step)."""
    return optimize_pb2.MethodOptions(
        method=optimize_pb2.METHOD_NEWTON,
        step_policy=optimize_pb2.STEP_POLICY_LINE_SEARCH,
        learning_rate=1.0,
        damping=0.1,
        curvature=optimize_pb2.CURVATURE_HESSIAN,
        backend=optimize_pb2.BACKEND_AUTOGRAD,
        eigenvalue_floor=1e-6,
        armijo=1e-4,
        backtrack=0.5,
        max_backtracks=10,
        dense_budget_bytes=100_000,
        cg_max_iterations=10,
        cg_tolerance=1e-4,
        cg_forcing=optimize_pb2.CG_FORCING_FIXED,
        trust_radius=1.0,
        curvature_fraction=1.0,
        seed=1,
        hvp_mode=optimize_pb2.HVP_MODE_REVERSE_OVER_REVERSE,
        gradient_fraction=1.0,
    )


def spectrum_options() -> optimize_pb2.SpectrumOptions:
    """Valid, cheap spectrum options with every field set."""
    return optimize_pb2.SpectrumOptions(
        top_k=2,
        bottom_k=2,
        curvature=optimize_pb2.CURVATURE_HESSIAN,
        max_lanczos_iterations=9,
        eigen_tolerance=1e-3,
        trace_samples=3,
        confidence=0.9,
        density_probes=1,
        density_steps=3,
        density_sigma=0.1,
        grid_points=8,
        batch_size=1,
        relative_tolerance=1e-6,
        absolute_tolerance=1e-9,
        gradient_tolerance=1e-6,
        seed=2,
        hvp_mode=optimize_pb2.HVP_MODE_REVERSE_OVER_REVERSE,
        block_size=1,
        backend=optimize_pb2.BACKEND_AUTOGRAD,
    )


def base_requests(run_id: str, page_token: str) -> dict[str, list[Message]]:
    """Valid requests of every RPC (DeleteRun's and DeleteProblem's name nothing stored)."""
    params = tensor([SOFTMAX_PARAMS], [0.01 * i for i in range(SOFTMAX_PARAMS)])
    mlp_params = tensor([MLP_PARAMS], [0.1] * MLP_PARAMS)
    gd = optimize_pb2.MethodOptions(
        method=optimize_pb2.METHOD_GRADIENT_DESCENT, learning_rate=0.1, damping=0.0
    )
    stopping = optimize_pb2.StopCriteria(
        max_iterations=3,
        gradient_tolerance=1e-9,
        function_tolerance=1e-12,
        parameter_tolerance=1e-12,
        time_limit_seconds=30.0,
    )
    step = [
        service_pb2.StepRequest(problem=SOFTMAX, params=params, options=method_options()),
        service_pb2.StepRequest(problem=MLP, params=mlp_params, options=method_options()),
    ]
    requests = {
        "CreateProblem": [
            service_pb2.CreateProblemRequest(problem=SOFTMAX),
            service_pb2.CreateProblemRequest(problem=MLP),
        ],
        "SampleTensors": [
            service_pb2.SampleTensorsRequest(
                seed=3,
                tensors=[
                    optimize_pb2.TensorSpec(
                        shape=[2, 3],
                        dtype=tensor_pb2.DTYPE_FLOAT64,
                        distribution=optimize_pb2.DISTRIBUTION_NORMAL,
                    )
                ],
            )
        ],
        "GradientStep": [service_pb2.StepRequest(problem=SOFTMAX, params=params, options=gd)],
        "NewtonStep": step,
        "ComputeHessian": [
            service_pb2.ComputeHessianRequest(
                problem=SOFTMAX,
                params=params,
                curvature=optimize_pb2.CURVATURE_HESSIAN,
                backend=optimize_pb2.BACKEND_AUTOGRAD,
                omit_matrix=False,
                dense_budget_bytes=100_000,
            )
        ],
        "AnalyzeCurvature": [
            service_pb2.AnalyzeCurvatureRequest(
                problem=SOFTMAX, params=params, options=spectrum_options()
            )
        ],
        "StartRun": [
            service_pb2.StartRunRequest(
                problem=SOFTMAX,
                options=gd,
                stopping=stopping,
                init=optimize_pb2.Initializer(
                    seed=4, distribution=optimize_pb2.DISTRIBUTION_NORMAL
                ),
                name="hostile",
            ),
            service_pb2.StartRunRequest(
                problem=MLP, options=gd, stopping=stopping, initial_params=mlp_params
            ),
        ],
        "WatchRun": [service_pb2.WatchRunRequest(run_id=run_id, from_iteration=1)],
        "GetRun": [service_pb2.GetRunRequest(run_id=run_id, include_params=True)],
        "ListRuns": [
            service_pb2.ListRunsRequest(
                page_size=5, page_token=page_token, status=[service_pb2.RUN_STATUS_FINISHED]
            )
        ],
        "CancelRun": [service_pb2.CancelRunRequest(run_id=run_id)],
        "ResumeRun": [service_pb2.ResumeRunRequest(run_id=run_id)],
        "DeleteRun": [service_pb2.DeleteRunRequest(run_id="r-" + "0" * 32)],
        "DeleteProblem": [service_pb2.DeleteProblemRequest(problem_id="p-" + "0" * 40)],
        "GetServerInfo": [service_pb2.GetServerInfoRequest()],
        "Predict": [service_pb2.PredictRequest(problem=SOFTMAX, params=params)],
        # the first message of the stream (the caller half-closes after it: INTERRUPTED)
        "Optimize": [
            service_pb2.OptimizeRequest(
                start=service_pb2.OptimizeStart(
                    initial_params=params,
                    options=gd,
                    stopping=stopping,
                    capabilities=service_pb2.Capabilities(gradient=True),
                    name="hostile",
                )
            )
        ],
    }
    requests["StartAndWatchRun"] = requests["StartRun"]  # the same request, one call
    return requests


def _at(root: Message, steps: list[Step]) -> Any:
    """The sub-message of `root` that `steps` lead to (created when unset)."""
    node: Any = root
    for name, key in steps:
        node = getattr(node, name)
        if key is not None:
            node = node[key]
    return node


def _path(steps: list[Step]) -> str:
    out = ""
    for name, key in steps:
        out += ("." if out else "") + name
        if isinstance(key, int):
            out += f"[{key}]"
        elif key is not None:
            out += f".{key}"
    return out


Mutation = tuple[str, str, Callable[[Message], None]]


def _tensor_mutations(steps: list[Step]) -> Iterator[Mutation]:
    """Kinds aimed at a Tensor field: rank, dtype, shape/byte mismatch, non-finite values."""

    def setter(fn: Callable[[tensor_pb2.Tensor], None]) -> Callable[[Message], None]:
        return lambda root: fn(_at(root, steps))

    def reshape(shape: list[int], data: bytes | None = None) -> Callable[[Message], None]:
        def apply(t: tensor_pb2.Tensor) -> None:
            t.shape[:] = shape
            if data is not None:
                t.data = data

        return setter(apply)

    def retype(dtype: int, itemsize: int | None) -> Callable[[Message], None]:
        def apply(t: tensor_pb2.Tensor) -> None:
            t.dtype = dtype
            if itemsize is not None:
                t.data = b"\x01" * (itemsize * math.prod(t.shape))

        return setter(apply)

    def refill(value: float) -> Callable[[Message], None]:
        def apply(t: tensor_pb2.Tensor) -> None:
            count = math.prod(t.shape) or 1
            t.dtype, t.shape[:] = tensor_pb2.DTYPE_FLOAT64, list(t.shape) or [1]
            t.data = _f64([value] + [0.0] * (count - 1))

        return setter(apply)

    for rank in (33, 65, 1000):
        yield "rank", f"rank {rank}", reshape([1] * rank, _f64([0.0]))
    yield "repeated", "a shape of 100000 sizes", reshape([1] * OVERSIZED_REPEATED, _f64([0.0]))
    for dtype, itemsize in ((0, None), (99, 8), (-7, 8), (tensor_pb2.DTYPE_INT64, 8)):
        yield "dtype", f"dtype {dtype}", retype(dtype, itemsize)
    yield "dtype", "float32", retype(tensor_pb2.DTYPE_FLOAT32, 4)
    for shape, data, what in (
        ([3], _f64([0.0] * 2), "bytes short"),
        ([1], _f64([0.0]) + b"\0", "bytes long"),
        ([-1], b"", "negative size"),
        ([2**62, 2**62], b"", "sizes overflowing int64"),
        ([0, 2**40, 2**40], b"", "nonzero product too large"),
        ([2**31, 2**31], _f64([0.0]), "4e18 values"),
        ([], b"", "a scalar without bytes"),
    ):
        yield "mismatch", what, reshape(shape, data)
    for value in (math.nan, math.inf, -math.inf):
        yield "nonfinite", f"value {value}", refill(value)


def _scalar_mutations(fd: FieldDescriptor, steps: list[Step]) -> Iterator[Mutation]:
    """Kinds aimed at a scalar (or the first element of a repeated scalar)."""
    name = fd.name
    repeated = fd.is_repeated

    def put(value: Any) -> Callable[[Message], None]:
        def apply(root: Message) -> None:
            parent = _at(root, steps)
            if repeated:
                field = getattr(parent, name)
                if len(field):
                    field[0] = value
                else:
                    field.append(value)
            else:
                setattr(parent, name, value)

        return apply

    if fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        for value in FLOATS:
            yield "nonfinite", repr(value), put(value)
    elif fd.type in INT_LIMITS:
        for value in INT_LIMITS[fd.type]:
            yield "integer", str(value), put(value)
    elif fd.type == F.TYPE_ENUM:
        for value in (99, -1, 2**31 - 1):
            yield "enum", str(value), put(value)
    elif fd.type == F.TYPE_STRING:
        yield "huge_string", "200000 characters", put(HUGE_STRING)
        yield "huge_string", "control and non-ASCII characters", put("\x00\u00e9\u2028\U0001f600")
    if repeated:
        default = {F.TYPE_STRING: "x", F.TYPE_BOOL: True}.get(fd.type, 1)

        def flood(root: Message) -> None:
            getattr(_at(root, steps), name).extend([default] * OVERSIZED_REPEATED)

        yield "repeated", f"{OVERSIZED_REPEATED} elements", flood
    if fd.type == F.TYPE_INT64 and name == "shape":
        for rank in (33, 65):
            yield "rank", f"rank {rank}", put_all(steps, name, [1] * rank)


def put_all(steps: list[Step], name: str, values: list[Any]) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        getattr(_at(root, steps), name)[:] = values

    return apply


def _map_mutations(fd: FieldDescriptor, steps: list[Step], node: Message) -> Iterator[Mutation]:
    name = fd.name

    def add(key: str, count: int) -> Callable[[Message], None]:
        def apply(root: Message) -> None:
            field = getattr(_at(root, steps), name)
            for i in range(count):
                field[f"{key}{i}" if count > 1 else key].CopyFrom(tensor([1]))

        return apply

    yield "huge_string", "a 200000-character key", add(HUGE_STRING, 1)
    yield "huge_string", "a control-character key", add("\x00\n", 1)
    yield "repeated", "20000 entries", add("k", 20_000)
    value_type = fd.message_type.fields_by_name["value"].message_type
    for key in getattr(node, name):
        yield from _walk_tensor_or_message(value_type, [*steps, (name, key)], None)


def _walk_tensor_or_message(
    descriptor: Any, steps: list[Step], node: Message | None
) -> Iterator[Mutation]:
    if descriptor.full_name == "hessian.v1.Tensor":
        yield from _tensor_mutations(steps)
    elif node is not None:
        yield from _message_mutations(node, steps)


def _message_mutations(node: Message, steps: list[Step], depth: int = 0) -> Iterator[Mutation]:
    """Every mutation of every field under `node` (unset messages are walked when present)."""
    for fd in node.DESCRIPTOR.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            yield from _map_mutations(fd, steps, node)
        elif fd.type == F.TYPE_MESSAGE:
            if fd.is_repeated:
                items = getattr(node, fd.name)

                def flood(root: Message, fd: FieldDescriptor = fd) -> None:
                    field = getattr(_at(root, steps), fd.name)
                    template = field[0] if len(field) else GetMessageClass(fd.message_type)()
                    for _ in range(OVERSIZED_REPEATED // 10):
                        field.add().CopyFrom(template)

                yield "repeated", f"{OVERSIZED_REPEATED // 10} messages", flood
                if len(items):
                    sub = [*steps, (fd.name, 0)]
                    yield from _walk_tensor_or_message(fd.message_type, sub, items[0])
                    if fd.message_type.full_name != "hessian.v1.Tensor" and depth < 4:
                        yield from _message_mutations(items[0], sub, depth + 1)
                continue
            sub = [*steps, (fd.name, None)]
            present = node.HasField(fd.name)
            if fd.message_type.full_name == "hessian.v1.Tensor":
                if present or depth == 0:
                    yield from _tensor_mutations(sub)
            elif present and depth < 4:
                yield from _message_mutations(getattr(node, fd.name), sub, depth + 1)
        else:
            yield from _scalar_mutations(fd, steps)


def _nested_tokens() -> Iterator[tuple[str, str]]:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode()

    yield "nested 100000 deep", b64(b"[" * 100_000 + b"]" * 100_000)
    yield "nested 150 deep", b64(b"[" * 150 + b"]" * 150)
    yield "nested objects", b64(b'{"a":' * 90 + b"0" + b"}" * 90)
    yield "nested in a valid shape", b64(b'[1.0, ["' + b"[" * 100 + b'"]]')
    yield "20 KB", "A" * 20_000


def cases(run_id: str, page_token: str, max_message_bytes: int) -> Iterator[Case]:
    """Every hostile case: (kind, rpc, what, serialized request)."""
    for rpc, bases in base_requests(run_id, page_token).items():
        for base in bases:
            for kind, what, mutate in _message_mutations(base, []):
                msg = type(base)()
                msg.CopyFrom(base)
                mutate(msg)
                yield kind, rpc, what, msg.SerializeToString()
            raw = base.SerializeToString()
            # field 999 (unknown to every request), as bytes and as a varint
            unknown = b"\xba\x3e" + _varint(200_000) + b"u" * 200_000
            yield "unknown_fields", rpc, "an unknown 200 KB field", raw + unknown
            yield "unknown_fields", rpc, "an unknown varint", raw + b"\xb8\x3e\x01"
            over = b"\xba\x3e" + _varint(max_message_bytes) + b"o" * max_message_bytes
            yield "oversized_message", rpc, "over --max-message-bytes", raw + over
        if rpc == "ListRuns":
            for what, token in _nested_tokens():
                msg = service_pb2.ListRunsRequest(page_token=token)
                yield "page_token", rpc, what, msg.SerializeToString()


def call(channel: grpc.Channel, rpc: str, raw: bytes) -> tuple[grpc.StatusCode, str, bytes]:
    """(code, details, last response bytes) of one call with an already serialized request."""
    path = f"/{SERVICE.full_name}/{rpc}"
    try:
        if SERVICE.methods_by_name[rpc].client_streaming:
            answer = b""
            for event in channel.stream_stream(path)(iter([raw]), timeout=30):
                answer = event
        elif SERVICE.methods_by_name[rpc].server_streaming:
            answer = b""
            for event in channel.unary_stream(path)(raw, timeout=30):
                answer = event
        else:
            answer = channel.unary_unary(path)(raw, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", b""
    return grpc.StatusCode.OK, "", answer


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
