"""Wire <-> engine translation: tensors, enums, options, criteria and records. No maths.

Every decoding failure raises the engine's ValidationError naming the proto field, so it
reaches the caller as INVALID_ARGUMENT with that name.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from google.protobuf.message import Message
from hessian_client.proto import optimize_pb2, service_pb2, tensor_pb2

from ..engine.analysis.spectrum import CurvatureReport, TraceEstimate
from ..engine.errors import ResourceLimitError, ValidationError
from ..engine.records import StepRecord

TORCH_DTYPES = {
    tensor_pb2.DTYPE_FLOAT32: torch.float32,
    tensor_pb2.DTYPE_FLOAT64: torch.float64,
    tensor_pb2.DTYPE_INT64: torch.int64,
}
WIRE_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
NUMPY_DTYPES = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
}
MAX_SHAPE_ELEMENTS = 2**40
# Most dimensions a tensor may have on the wire. torch and numpy stop at 64 (past it they raise
# an untyped error); 32 leaves room for the engine's own reshapes and is far beyond any
# objective's data (at most 2-d) or any sensible parameter shape.
MAX_RANK = 32
# Run names and page tokens are short by design; bounding them keeps every RunInfo small
# enough that a full ListRuns page fits a message.
MAX_NAME_CHARS = 256
MAX_PAGE_TOKEN_CHARS = 512
DTYPE_NAMES = {tensor_pb2.DTYPE_FLOAT32: "float32", tensor_pb2.DTYPE_FLOAT64: "float64"}
# StepRecord fields written by name as they are; the enum ones map engine names to values
RECORD_ENUMS = {"end_point": optimize_pb2.Verdict}
RECORD_FIELDS = [
    f.name
    for f in fields(StepRecord)
    if f.name in optimize_pb2.StepRecord.DESCRIPTOR.fields_by_name and f.name not in RECORD_ENUMS
]


def decode_tensor(
    tensor: tensor_pb2.Tensor, field: str, *, max_elements: int | None = None
) -> torch.Tensor:
    """A torch tensor from the wire, checking dtype, shape, byte length and finiteness."""
    if tensor.dtype not in TORCH_DTYPES:
        name = tensor_pb2.DType.Name(tensor.dtype) if tensor.dtype == 0 else str(tensor.dtype)
        raise ValidationError(f"{field}.dtype", "FLOAT32, FLOAT64 or INT64", name)
    shape = check_shape(tensor.shape, f"{field}.shape")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise ResourceLimitError(
            f"{field}.shape", f"{numel} values, over the server limit of {max_elements}"
        )
    dt = NUMPY_DTYPES[tensor.dtype]
    raw = tensor.data
    if len(raw) != numel * dt.itemsize:
        raise ValidationError(
            f"{field}.data",
            f"{numel * dt.itemsize} bytes ({numel} x {dt.itemsize} for shape {shape})",
            f"{len(raw)} bytes",
        )
    array = np.frombuffer(raw, dtype=dt)
    if dt.kind == "f" and not np.isfinite(array).all():
        raise ValidationError(field, "finite values", "NaN or inf")
    return torch.from_numpy(array.astype(dt.newbyteorder("=")).reshape(shape))


def field_bytes(payload: int) -> int:
    """Wire size of one length-delimited field (field number below 16) of `payload` bytes."""
    return 1 + (max(payload, 1).bit_length() + 6) // 7 + payload


def _widest_record() -> int:
    """An upper bound on one StepRecord's wire size inside its parent: every number at its
    widest encoding, a 64-character backend name (the engine's are a few characters)."""
    msg = optimize_pb2.StepRecord()
    for fd in msg.DESCRIPTOR.fields:
        if fd.type == fd.TYPE_STRING:
            setattr(msg, fd.name, "x" * 64)
        elif fd.type == fd.TYPE_BOOL:
            setattr(msg, fd.name, True)
        elif fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
            setattr(msg, fd.name, math.pi)
        else:
            setattr(msg, fd.name, -1)  # a negative varint takes its full 10 bytes
    return field_bytes(msg.ByteSize())


def check_shape(shape: Sequence[int], field: str) -> list[int]:
    """`shape` as a list after checking its rank and sizes (ValidationError naming `field`)."""
    if len(shape) > MAX_RANK:
        raise ValidationError(field, f"at most {MAX_RANK} dimensions", f"{len(shape)}")
    shape = list(shape)
    if any(s < 0 for s in shape):
        raise ValidationError(field, "non-negative sizes", shape)
    if math.prod(s for s in shape if s) > MAX_SHAPE_ELEMENTS:
        # Even with a zero size in it (0 elements) such a shape cannot be represented.
        raise ValidationError(
            field, f"sizes whose nonzero product is at most {MAX_SHAPE_ELEMENTS}", shape
        )
    return shape


def tensor_wire_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Exact wire size of a Tensor of `shape` (itemsize-byte values) inside its parent field.

    Computed without the data, so a response can be sized before anything is generated.
    """
    body = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=shape).ByteSize()
    nbytes = math.prod(shape) * itemsize
    if nbytes:
        body += field_bytes(nbytes)
    return field_bytes(body)


MAX_RECORD_BYTES = _widest_record()


def encode_tensor(
    t: torch.Tensor,
    shape: list[int] | tuple[int, ...] | None = None,
    out: tensor_pb2.Tensor | None = None,
) -> tensor_pb2.Tensor:
    """A wire Tensor from a torch tensor (reshaped to `shape` when given), filled into `out`."""
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in WIRE_DTYPES:
        t = t.to(torch.float64)
    wire = WIRE_DTYPES[t.dtype]
    array = np.ascontiguousarray(t.numpy(), dtype=NUMPY_DTYPES[wire])
    msg = out if out is not None else tensor_pb2.Tensor()
    msg.dtype = wire
    msg.shape[:] = shape if shape is not None else t.shape
    msg.data = array.tobytes()
    return msg


def enum_name(enum_type: Any, value: int, field: str) -> str | None:
    """The engine name of a wire enum value (prefix stripped, lower case); None if unset."""
    if value == 0:
        return None
    try:
        name = enum_type.Name(value)
    except ValueError:
        raise ValidationError(field, f"one of {list(enum_type.keys())[1:]}", value) from None
    prefix = enum_type.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix).lower()


def enum_value(enum_type: Any, name: str) -> int:
    """The wire value of an engine name (0, UNSPECIFIED, when unknown or empty)."""
    prefix = enum_type.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
    try:
        return enum_type.Value(prefix + name.upper()) if name else 0
    except ValueError:
        return 0


OPTION_ENUMS = {
    "method": optimize_pb2.Method,
    "step_policy": optimize_pb2.StepPolicy,
    "curvature": optimize_pb2.Curvature,
    "backend": optimize_pb2.Backend,
    "cg_forcing": optimize_pb2.CgForcing,
    "hvp_mode": optimize_pb2.HvpMode,
}
OPTION_SCALARS = (
    "learning_rate",
    "eigenvalue_floor",
    "armijo",
    "backtrack",
    "max_backtracks",
    "dense_budget_bytes",
    "cg_max_iterations",
    "cg_tolerance",
    "trust_radius",
    "curvature_fraction",
    "seed",
    "gradient_fraction",
)
SPECTRUM_ENUMS = {
    "curvature": optimize_pb2.Curvature,
    "hvp_mode": optimize_pb2.HvpMode,
    "backend": optimize_pb2.Backend,
}
SPECTRUM_SCALARS = tuple(
    f.name for f in optimize_pb2.SpectrumOptions.DESCRIPTOR.fields if f.name not in SPECTRUM_ENUMS
)
STOP_FIELDS = (
    "max_iterations",
    "gradient_tolerance",
    "function_tolerance",
    "parameter_tolerance",
    "time_limit_seconds",
)


def _set_fields(
    msg: Any, enums: dict[str, Any], scalars: tuple[str, ...], field: str
) -> dict[str, Any]:
    """{name: value} of an options message's set enum and scalar fields (enums by name)."""
    out: dict[str, Any] = {}
    for name, enum_type in enums.items():
        value = enum_name(enum_type, getattr(msg, name), f"{field}.{name}")
        if value is not None:
            out[name] = value
    for name in scalars:
        if msg.HasField(name):
            out[name] = getattr(msg, name)
    return out


def options_to_dict(msg: optimize_pb2.MethodOptions, field: str = "options") -> dict[str, Any]:
    """The engine's MethodOptions dict from the wire (unset fields omitted)."""
    out = _set_fields(msg, OPTION_ENUMS, OPTION_SCALARS, field)
    if msg.damping:
        out["damping"] = msg.damping
    return out


def options_to_wire(values: dict[str, Any]) -> optimize_pb2.MethodOptions:
    """The wire MethodOptions for an engine options dict."""
    msg = optimize_pb2.MethodOptions()
    for name, enum_type in OPTION_ENUMS.items():
        if values.get(name):
            setattr(msg, name, enum_value(enum_type, values[name]))
    for name in OPTION_SCALARS:
        if values.get(name) is not None:
            setattr(msg, name, values[name])
    msg.damping = float(values.get("damping") or 0.0)
    return msg


def spectrum_to_dict(msg: optimize_pb2.SpectrumOptions, field: str = "options") -> dict[str, Any]:
    """The engine's SpectrumOptions dict from the wire (unset fields omitted)."""
    return _set_fields(msg, SPECTRUM_ENUMS, SPECTRUM_SCALARS, field)


def stopping_to_dict(msg: optimize_pb2.StopCriteria) -> dict[str, Any]:
    """The engine's StopCriteria dict from the wire (unset fields omitted)."""
    return {name: getattr(msg, name) for name in STOP_FIELDS if msg.HasField(name)}


def stopping_to_wire(values: dict[str, Any]) -> optimize_pb2.StopCriteria:
    """The wire StopCriteria for an engine criteria dict."""
    msg = optimize_pb2.StopCriteria()
    for name in STOP_FIELDS:
        if values.get(name) is not None:
            setattr(msg, name, values[name])
    return msg


def encode_page_token(created_at: float, run_id: str) -> str:
    """The ListRuns page token that continues after the run (created_at, run_id)."""
    return base64.urlsafe_b64encode(json.dumps([created_at, run_id]).encode()).decode()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a time")


def decode_page_token(token: str, field: str = "page_token") -> tuple[float, str]:
    """(created_at, run_id) of a token encode_page_token made; anything else is refused.

    The length is bounded before decoding (no deep nesting, no large input reaches json) and
    the decoded value must have exactly the issued shape; the token is never echoed back.
    """
    expected = "a next_page_token returned by ListRuns"
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise ValidationError(
            field, f"{expected} (at most {MAX_PAGE_TOKEN_CHARS} characters)", f"{len(token)}"
        )
    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # binascii, Unicode and JSON errors are ValueErrors
        value = None
    if not (
        isinstance(value, list)
        and len(value) == 2
        and type(value[0]) is float
        and math.isfinite(value[0])
        and type(value[1]) is str
        and len(value[1]) <= MAX_NAME_CHARS
    ):
        raise ValidationError(field, expected, "a token this server did not issue")
    return value[0], value[1]


def record_to_wire(record: StepRecord, out: Message | None = None) -> optimize_pb2.StepRecord:
    """The wire StepRecord (the engine's dataclass fields that the wire has, one for one)."""
    msg = optimize_pb2.StepRecord(**{name: getattr(record, name) for name in RECORD_FIELDS})
    for name, enum_type in RECORD_ENUMS.items():
        setattr(msg, name, enum_value(enum_type, getattr(record, name)))
    if out is None:
        return msg
    out.CopyFrom(msg)
    return out


def stop_reason_value(reason: str) -> int:
    """The wire StopReason for an engine stop reason name (engine StopReason, or the
    store's "shutdown" / "error" and earlier servers' "function_tolerance" ...)."""
    return enum_value(optimize_pb2.StopReason, reason)


def _trace_to_wire(estimate: TraceEstimate, out: optimize_pb2.TraceEstimate) -> None:
    out.estimate = estimate.estimate
    out.half_width = estimate.half_width
    out.confidence = estimate.confidence
    out.products = estimate.products


def report_to_wire(report: CurvatureReport) -> service_pb2.AnalyzeCurvatureResponse:
    """The wire AnalyzeCurvatureResponse for an engine CurvatureReport (field for field)."""
    msg = service_pb2.AnalyzeCurvatureResponse(
        num_params=report.num_params,
        curvature=enum_value(optimize_pb2.Curvature, report.curvature),
        loss=report.loss,
        gradient_max_norm=report.gradient_max_norm,
        stationary=report.stationary,
        top_eigenvalues=report.top_eigenvalues,
        bottom_eigenvalues=report.bottom_eigenvalues,
        eigen_residuals=report.eigen_residuals,
        lanczos_iterations=report.lanczos_iterations,
        eigenvalues_converged=report.eigenvalues_converged,
        products=report.products,
        products_by_part=report.products_by_part,
        verdict=enum_value(optimize_pb2.Verdict, report.verdict),
        verdict_reason=report.verdict_reason,
        seconds=report.seconds,
        backend=report.backend,
    )
    if report.trace_hutchinson is not None:
        _trace_to_wire(report.trace_hutchinson, msg.trace_hutchinson)
    if report.trace_hutchpp is not None:
        _trace_to_wire(report.trace_hutchpp, msg.trace_hutchpp)
    density = report.density
    if density is not None:
        encode_tensor(density.grid, out=msg.density.grid)
        encode_tensor(density.density, out=msg.density.density)
        msg.density.sigma = density.sigma
        msg.density.probes = density.probes
        msg.density.steps = density.steps
        msg.density.trace = density.trace
    return msg
