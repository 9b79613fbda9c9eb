"""Wire <-> engine translation: tensors, enums, options, criteria and records. No maths.

Every decoding failure raises the engine's ValidationError naming the proto field, so it
reaches the caller as INVALID_ARGUMENT with that name.
"""

from __future__ import annotations

import base64
import enum
import json
import math
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from dataclasses import fields
from operator import attrgetter
from typing import Any, TypeVar

import numpy as np
import torch
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message
from hessian_client.proto import optimize_pb2, service_pb2, tensor_pb2

from ..engine.analysis.curvature_summary import DenseCurvature
from ..engine.analysis.spectrum import CurvatureReport, SpectrumOptions, TraceEstimate
from ..engine.errors import ResourceLimitError, ValidationError
from ..engine.records import StepRecord, StopReason
from ..store import RunRow, RunStatus

# A run's state: RunInfo or an RPC's response that copies its fields (StartRunResponse ...)
RunState = TypeVar("RunState", bound=Message)

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


def check_run_name(name: str, field: str) -> None:
    """A run's name: at most MAX_NAME_CHARS characters, none of them a control or format
    character (a name with terminal escapes, CR or NUL printed as is by a listing forged
    rows and ran escape sequences on an admin's terminal)."""
    if len(name) > MAX_NAME_CHARS:
        raise ValidationError(field, f"at most {MAX_NAME_CHARS} characters", len(name))
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        raise ValidationError(
            field, "printable characters (no control or format characters)", f"{bad!r} in it"
        )


DTYPE_NAMES = {tensor_pb2.DTYPE_FLOAT32: "float32", tensor_pb2.DTYPE_FLOAT64: "float64"}
# StepRecord fields written by name as they are; the enum ones map engine names to values
RECORD_ENUMS = {"end_point": optimize_pb2.Verdict}
RECORD_FIELDS = [
    f.name
    for f in fields(StepRecord)
    if f.name in optimize_pb2.StepRecord.DESCRIPTOR.fields_by_name and f.name not in RECORD_ENUMS
]
_record_getter = attrgetter(*RECORD_FIELDS)
M = TypeVar("M", bound=Message)


def dtype_name(value: int) -> str:
    """A wire DType as messages name it (FLOAT64, UNSPECIFIED; a number it does not know)."""
    if value in tensor_pb2.DType.values():
        return tensor_pb2.DType.Name(value).removeprefix("DTYPE_")
    return str(value)


def check_dtype(value: int, allowed: Collection[int], field: str) -> None:
    """Refuse a wire dtype not in `allowed`, naming each allowed one (ValidationError)."""
    if value not in allowed:
        names = [dtype_name(d) for d in allowed]
        expected = ", ".join(names[:-1]) + " or " + names[-1]
        raise ValidationError(field, expected, dtype_name(value))


def decode_tensor(
    tensor: tensor_pb2.Tensor,
    field: str,
    *,
    max_elements: int | None = None,
    floating: bool = False,
) -> torch.Tensor:
    """A torch tensor from the wire, checking dtype (`floating`: FLOAT32 or FLOAT64 only,
    as parameters), shape, byte length and finiteness."""
    check_dtype(tensor.dtype, DTYPE_NAMES if floating else TORCH_DTYPES, f"{field}.dtype")
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
CUT_MARK = " [cut]"


def cut_utf8(text: str, nbytes: int) -> str:
    """`text` in at most `nbytes` UTF-8 bytes, marked as cut when it was (never mid-char)."""
    if len(text.encode()) <= nbytes:
        return text
    if nbytes < len(CUT_MARK):
        return ""
    return text.encode()[: nbytes - len(CUT_MARK)].decode(errors="ignore") + CUT_MARK


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


def _enum_descriptor(enum_type: Any) -> EnumDescriptor:
    """The descriptor of a generated enum (its wrapper or the descriptor itself)."""
    return getattr(enum_type, "DESCRIPTOR", enum_type)


def enum_name(enum_type: Any, value: int, field: str) -> str | None:
    """The engine name of a wire enum value (prefix stripped, lower case); None if unset."""
    if value == 0:
        return None
    desc = _enum_descriptor(enum_type)
    known = desc.values_by_number.get(value)
    if known is None:
        raise ValidationError(field, f"one of {[v.name for v in desc.values[1:]]}", value)
    prefix = desc.values[0].name.removesuffix("UNSPECIFIED")
    return known.name.removeprefix(prefix).lower()


def enum_value(enum_type: Any, name: str) -> int:
    """The wire value of an engine name (0, UNSPECIFIED, when unknown or empty)."""
    if not name:
        return 0
    desc = _enum_descriptor(enum_type)
    prefix = desc.values[0].name.removesuffix("UNSPECIFIED")
    known = desc.values_by_name.get(prefix + name.upper())
    return known.number if known is not None else 0


def message_to_dict(msg: Message, field: str) -> dict[str, Any]:
    """{name: value} of an options message's set fields, enums by engine name.

    The field list is the message descriptor's: an unset optional (or a 0 enum, UNSPECIFIED)
    is left out, so the engine's default applies; an explicitly set optional is kept.
    """
    return {
        fd.name: enum_name(fd.enum_type, value, f"{field}.{fd.name}") if fd.enum_type else value
        for fd, value in msg.ListFields()
    }


def dict_to_message(values: dict[str, Any], message: type[M]) -> M:
    """The wire message for an engine dict: its keys the message has, None and "" left unset."""
    msg = message()
    for fd in msg.DESCRIPTOR.fields:
        value = values.get(fd.name)
        if value is None or value == "":
            continue
        setattr(msg, fd.name, enum_value(fd.enum_type, value) if fd.enum_type else value)
    return msg


def options_to_dict(msg: optimize_pb2.MethodOptions, field: str = "options") -> dict[str, Any]:
    """The engine's MethodOptions dict from the wire (unset fields omitted)."""
    return message_to_dict(msg, field)


def options_to_wire(values: dict[str, Any]) -> optimize_pb2.MethodOptions:
    """The wire MethodOptions for an engine options dict."""
    return dict_to_message(values, optimize_pb2.MethodOptions)


def spectrum_to_dict(msg: optimize_pb2.SpectrumOptions, field: str = "options") -> dict[str, Any]:
    """The engine's SpectrumOptions dict from the wire (unset fields omitted)."""
    return message_to_dict(msg, field)


def stopping_to_dict(msg: optimize_pb2.StopCriteria, field: str = "stopping") -> dict[str, Any]:
    """The engine's StopCriteria dict from the wire (unset fields omitted)."""
    return message_to_dict(msg, field)


def stopping_to_wire(values: dict[str, Any]) -> optimize_pb2.StopCriteria:
    """The wire StopCriteria for an engine criteria dict."""
    return dict_to_message(values, optimize_pb2.StopCriteria)


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
        and "\x00" not in value[1]  # no run id has one (PostgreSQL's text refuses it)
    ):
        raise ValidationError(field, expected, "a token this server did not issue")
    return value[0], value[1]


def _record_values(record: StepRecord) -> dict[str, Any]:
    """The wire StepRecord's field values (the engine's dataclass fields that the wire has,
    one for one; enums by value)."""
    values = dict(zip(RECORD_FIELDS, _record_getter(record), strict=True))
    for name, enum_type in RECORD_ENUMS.items():
        values[name] = enum_value(enum_type, getattr(record, name))
    return values


def record_to_wire(record: StepRecord, out: Message | None = None) -> optimize_pb2.StepRecord:
    """The wire StepRecord (into `out` when given)."""
    msg = optimize_pb2.StepRecord(**_record_values(record))
    if out is None:
        return msg
    out.CopyFrom(msg)
    return out


def add_records(repeated: Any, records: Iterable[StepRecord]) -> None:
    """Append `records` to a repeated StepRecord field, each built in place (no copy)."""
    for record in records:
        repeated.add(**_record_values(record))


def _by_name(enum: type[enum.Enum], wire: Any, prefix: str) -> dict[Any, int]:
    """{member: wire value} matched by name; every member and every wire value other than
    UNSPECIFIED must have its counterpart (checked at import, so a new one on either side
    fails the server's start, not a call)."""
    table = {member: wire.Value(prefix + member.name) for member in enum}
    unmatched = set(wire.values()) - {0, *table.values()}
    if unmatched:
        raise ImportError(f"{wire.DESCRIPTOR.name} values {sorted(unmatched)} have no {enum}")
    return table


# the one table each: the store's RunStatus and the engine's StopReason <-> the wire's enums
RUN_STATUSES = _by_name(RunStatus, service_pb2.RunStatus, "RUN_STATUS_")
WIRE_RUN_STATUSES = {value: status for status, value in RUN_STATUSES.items()}
STOP_REASONS = _by_name(StopReason, optimize_pb2.StopReason, "STOP_REASON_")


def status_value(status: RunStatus) -> int:
    """The wire RunStatus of a run status."""
    return RUN_STATUSES[status]


def status_from_wire(value: int, field: str) -> RunStatus:
    """The run status of a wire RunStatus (UNSPECIFIED and unknown values are refused)."""
    if value == 0:
        raise ValidationError(field, "a RunStatus other than UNSPECIFIED", 0)
    status = WIRE_RUN_STATUSES.get(value)
    if status is None:
        raise ValidationError(field, f"one of {list(service_pb2.RunStatus.keys())[1:]}", value)
    return status


def stop_reason_value(reason: StopReason | str) -> int:
    """The wire StopReason of a stored stop reason (0, UNSPECIFIED: none, or not one of ours)."""
    return STOP_REASONS.get(reason, 0)


def report_wire_bytes(options: SpectrumOptions, n: int) -> tuple[str, int]:
    """An upper bound on the parts of an AnalyzeCurvatureResponse that grow with the request
    (each value 8 bytes), and the option that grows it most (to name in a refusal)."""
    ritz = min(n, options.max_lanczos_iterations * options.block_size)  # eigenvalues it reports
    sizes = {
        "options.grid_points": (
            2 * tensor_wire_bytes([options.grid_points], 8) if options.density_probes else 0
        ),
        "options.top_k": 16 * min(options.top_k, ritz) + 8,  # the eigenvalue and its bound
        "options.bottom_k": 16 * min(options.bottom_k, ritz) + 8,
    }
    return max(sizes.items(), key=lambda kv: kv[1])[0], sum(sizes.values())


def curvature_to_wire(
    result: DenseCurvature, with_matrix: bool
) -> service_pb2.ComputeHessianResponse:
    """The wire ComputeHessianResponse of a dense curvature (the matrix only `with_matrix`)."""
    s = result.summary
    response = service_pb2.ComputeHessianResponse(
        summary=optimize_pb2.CurvatureSummary(
            min_eigenvalue=s.min_eigenvalue,
            max_eigenvalue=s.max_eigenvalue,
            negative_eigenvalues=s.negative_eigenvalues,
            condition_number=s.condition_number,
            positive_definite=s.positive_definite,
            trace=s.trace,
            negative_tolerance=s.negative_tolerance,
        ),
        loss=result.loss,
        gradient=encode_tensor(result.gradient),
        backend=result.backend,
    )
    if with_matrix:
        encode_tensor(result.matrix, out=response.matrix)
    return response


def run_to_wire(
    row: RunRow,
    live_record: StepRecord | None = None,
    message: type[RunState] = service_pb2.RunInfo,
) -> RunState:
    """A stored run as `message` (RunInfo, or an RPC's response that copies its fields);
    `live_record`, the newest committed record of a run executing here, stands for the row's
    last record (its count follows it)."""
    options = row.spec["options"]
    info = message(
        run_id=row.run_id,
        name=row.name,
        status=status_value(row.status),
        stop_reason=stop_reason_value(row.stop_reason),
        converged=row.converged,
        message=row.message,
        problem_id=row.problem_id,
        options=options_to_wire(options),
        method=enum_value(optimize_pb2.Method, options["method"]),
        method_note=row.spec.get("method_note", ""),
        stopping=stopping_to_wire(row.spec["stopping"]),
        backend=row.backend,
        num_records=row.num_records,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
    last = row.last_record
    # the newer of the two: a row read after a commit the live record has not yet been told
    # of (PostgreSQL: the commit's acknowledgement comes after it) is ahead of it
    if live_record is not None and (last is None or live_record.iteration > last.iteration):
        last = live_record
        info.num_records = max(row.num_records, last.iteration + 1)
    if last is not None:
        record_to_wire(last, info.last_record)
    return info


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
