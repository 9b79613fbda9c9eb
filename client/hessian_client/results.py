"""Typed results: frozen dataclasses with str enums derived from the proto descriptors.

Every result keeps its protobuf message as `.raw`. `to_dict()` gives JSON-ready values
(ints stay ints, iteration 0 stays, enums as their names, datetimes as ISO 8601).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from . import tensors
from .options import label
from .proto import optimize_pb2, service_pb2


def _str_enum(name: str, proto_enum: Any, prefix: str, *, lower: bool) -> type[enum.StrEnum]:
    """A StrEnum of the proto enum's values (UNSPECIFIED left out), named without `prefix`."""
    members = {}
    for value in proto_enum.DESCRIPTOR.values:
        label = value.name.removeprefix(prefix)
        if label != "UNSPECIFIED":
            members[label] = label.lower() if lower else label
    return enum.StrEnum(name, members, module=__name__)  # type: ignore[return-value]


RunStatus = _str_enum("RunStatus", service_pb2.RunStatus, "RUN_STATUS_", lower=False)
StopReason = _str_enum("StopReason", optimize_pb2.StopReason, "STOP_REASON_", lower=True)
Method = _str_enum("Method", optimize_pb2.Method, "METHOD_", lower=True)
Verdict = _str_enum("Verdict", optimize_pb2.Verdict, "VERDICT_", lower=True)
FINAL_STATUSES = frozenset(RunStatus) - {RunStatus.QUEUED, RunStatus.RUNNING}
# The wire messages holding a run's state: RunInfo and the RPC answers that copy its fields.
WireRunInfo = (
    service_pb2.RunInfo
    | service_pb2.StartRunResponse
    | service_pb2.GetRunResponse
    | service_pb2.CancelRunResponse
    | service_pb2.ResumeRunResponse
)


def _label(enum_cls: type[enum.StrEnum], proto_enum: Any, prefix: str, value: int) -> Any:
    """The StrEnum member for a wire value, None for UNSPECIFIED (0)."""
    if value == 0:
        return None
    return enum_cls[proto_enum.Name(value).removeprefix(prefix)]


def _time(seconds: float) -> datetime | None:
    return datetime.fromtimestamp(seconds, tz=UTC) if seconds else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value):
        return value.to_dict()  # type: ignore[union-attr]
    if hasattr(value, "DESCRIPTOR"):  # a protobuf message
        return proto_dict(value)
    if hasattr(value, "numpy") and hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy().tolist()
    return value


def proto_dict(msg: Any) -> dict[str, Any]:
    """A message as plain values without MessageToDict's losses: every field present (0 and
    "" included), int64 as int, enums by engine name ("newton", not "METHOD_NEWTON"),
    sub-messages and lists recursed."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            out[fd.name] = {
                k: proto_dict(v) if hasattr(v, "DESCRIPTOR") else v for k, v in value.items()
            }
        elif fd.is_repeated:
            out[fd.name] = [proto_dict(v) if hasattr(v, "DESCRIPTOR") else v for v in value]
        elif fd.message_type is not None:
            out[fd.name] = proto_dict(value) if msg.HasField(fd.name) else None
        elif fd.enum_type is not None:  # the engine's name, as the SDK's own enums give it
            out[fd.name] = label(fd.enum_type, value) or None
        else:
            out[fd.name] = _jsonable(value)
    return out


def _same(a: Any, b: Any) -> bool:
    """Whether two field values are equal as results compare them: NaN (a value not
    computed) equals NaN, and arrays (and tensors) by shape, dtype and values."""
    if hasattr(a, "detach") and hasattr(b, "detach"):  # torch tensors (not imported here)
        a, b = tensors.as_numpy(a), tensors.as_numpy(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _hash_part(value: Any) -> Any:
    """`value`'s share of a result's hash (None for what it leaves out)."""
    if isinstance(value, float):
        return 0.0 if math.isnan(value) else value  # hash(-0.0) == hash(0.0)
    if isinstance(value, str | int | enum.Enum | _Result) or value is None:
        return value
    return None


class _Result:
    """Equality, hashing and to_dict() for the result dataclasses below (the raw protobuf
    left out of all three): two reads of one run compare equal though a record's
    not-computed values are NaN, and final parameters compare as arrays."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(
            _same(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.compare
        )

    def __hash__(self) -> int:
        """From the fields equality compares exactly (floats with every NaN as one value and
        -0.0 as 0.0, strings, integers, enums, nested results); arrays and messages left out,
        so equal results hash alike."""
        return hash(
            (
                type(self).__name__,
                *(
                    _hash_part(getattr(self, f.name))
                    for f in dataclasses.fields(self)  # type: ignore[arg-type]
                    if f.compare
                ),
            )
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values: enums by name, datetimes ISO 8601, arrays as lists, NaN as None."""
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name != "raw"
        }


# A wire value's Python type, by its descriptor's cpp_type (an enum not converted stays its
# number, a message not converted stays the protobuf message).
_SCALARS: dict[int, Any] = {
    FieldDescriptor.CPPTYPE_DOUBLE: float,
    FieldDescriptor.CPPTYPE_FLOAT: float,
    FieldDescriptor.CPPTYPE_INT32: int,
    FieldDescriptor.CPPTYPE_INT64: int,
    FieldDescriptor.CPPTYPE_UINT32: int,
    FieldDescriptor.CPPTYPE_UINT64: int,
    FieldDescriptor.CPPTYPE_ENUM: int,
    FieldDescriptor.CPPTYPE_BOOL: bool,
    FieldDescriptor.CPPTYPE_STRING: str,
    FieldDescriptor.CPPTYPE_MESSAGE: Any,
}
# A conversion of one wire field: (the Python type it becomes, message -> value).
Conversion = tuple[Any, Callable[[Any], Any]]


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _wire_type(fd: FieldDescriptor) -> Any:
    """The Python type of a plain wire field (repeated: a list, map: a dict)."""
    if _is_map(fd):
        key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        return dict[_SCALARS[key.cpp_type], _SCALARS[value.cpp_type]]  # type: ignore[misc]
    if fd.is_repeated:
        return list[_SCALARS[fd.cpp_type]]  # type: ignore[misc]
    return _SCALARS[fd.cpp_type]


def wire_dataclass(
    name: str, message: Any, doc: str, converted: dict[str, Conversion] | None = None,
    *, raw: bool = False, module: str = __name__, base: type = _Result,
) -> Any:  # fmt: skip
    """A frozen result dataclass with one field per field of proto `message`, in its order,
    read from the descriptor (a field added to the proto appears with no edit here); the
    `converted` fields hold their conversion's type; `raw` adds the message as `.raw`;
    `base` (a _Result) may bring its own __repr__."""
    converted = converted or {}
    fields = [
        (fd.name, converted[fd.name][0] if fd.name in converted else _wire_type(fd))
        for fd in message.DESCRIPTOR.fields
    ]
    if raw:
        fields.append(
            ("raw", message | None, dataclasses.field(default=None, repr=False, compare=False))
        )
    own_repr = "__repr__" in vars(base)
    cls = dataclasses.make_dataclass(
        name, fields, bases=(base,), frozen=True, eq=False, repr=not own_repr
    )
    cls.__doc__, cls.__module__ = doc, module
    return cls


def _reader(fd: FieldDescriptor, converted: dict[str, Conversion]) -> Callable[[Any], Any]:
    """message -> the value of field `fd` for its wire_dataclass."""
    if fd.name in converted:
        return converted[fd.name][1]
    get = operator.attrgetter(fd.name)
    if _is_map(fd):
        return lambda msg: dict(get(msg))
    if fd.is_repeated:
        return lambda msg: list(get(msg))
    return get


# (message descriptor, id of its conversions) -> (those conversions, the fields' readers):
# read from the descriptor once, since a record stream decodes thousands of messages of one
# type; the conversions are held, so their id names them while the entry lives
_READERS: dict[tuple[Any, int], tuple[Any, tuple[tuple[str, Callable[[Any], Any]], ...]]] = {}


def wire_values(msg: Any, converted: dict[str, Conversion] | None = None) -> dict[str, Any]:
    """The field values of `msg` for its wire_dataclass (converted ones by their conversion)."""
    key = (msg.DESCRIPTOR, id(converted))
    entry = _READERS.get(key)
    if entry is None or entry[0] is not converted:
        fields = msg.DESCRIPTOR.fields
        entry = converted, tuple((fd.name, _reader(fd, converted or {})) for fd in fields)
        _READERS[key] = entry
    return {name: read(msg) for name, read in entry[1]}


# StepRecord's conversions: the end-point verdict as a Verdict (None: not a dense run's end)
_STEP_CONVERTED: dict[str, Conversion] = {
    "end_point": (
        Verdict | None,
        lambda m: _label(Verdict, optimize_pb2.Verdict, "VERDICT_", m.end_point),
    ),
}


_StepRecordFields = wire_dataclass(
    "_StepRecordFields",
    optimize_pb2.StepRecord,
    "The fields of a wire StepRecord, for StepRecord.",
    _STEP_CONVERTED,
    raw=True,
)


class StepRecord(_StepRecordFields):  # type: ignore[misc,valid-type]
    """One iteration's record (Ceres-style); NaN where a value was not computed. One field per
    field of optimize.proto's StepRecord (step_damped: the solve had to raise the damping;
    end_point: the verdict on the final record of a dense run), and the message as `raw`."""

    @classmethod
    def from_wire(cls, msg: optimize_pb2.StepRecord) -> StepRecord:
        """The typed record of a wire StepRecord (every field, iteration 0 included).

        A StepRecord is built without the frozen dataclass's __init__ (which sets each of two
        dozen fields through object.__setattr__: two thirds of a streamed record's
        decoding), every field from the values, as pickle restores a frozen instance; a
        subclass gets its own __init__ (and __post_init__)."""
        values = wire_values(msg, _STEP_CONVERTED)
        if cls is not StepRecord:
            return cls(**values, raw=msg)
        record = object.__new__(cls)
        record.__dict__.update(values, raw=msg)
        return record


def _setting(fd: FieldDescriptor) -> Conversion:
    """A field's value: None where unset, an enum by its engine name ("newton_cg", not
    METHOD_NEWTON_CG)."""

    def read(msg: Any) -> Any:
        if fd.has_presence and not msg.HasField(fd.name):
            return None
        value = getattr(msg, fd.name)
        return (label(fd.enum_type, value) or None) if fd.enum_type is not None else value

    return (str if fd.enum_type is not None else _wire_type(fd)) | None, read


_OPTIONS_CONVERTED = {fd.name: _setting(fd) for fd in optimize_pb2.MethodOptions.DESCRIPTOR.fields}
_STOPPING_CONVERTED = {fd.name: _setting(fd) for fd in optimize_pb2.StopCriteria.DESCRIPTOR.fields}


class _Settings(_Result):
    """A run's settings: the repr shows the ones set."""

    def __repr__(self) -> str:
        given = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if getattr(self, f.name) is not None
        )
        return f"{type(self).__name__}({given})"


RunOptions = wire_dataclass(
    "RunOptions",
    optimize_pb2.MethodOptions,
    "A run's method options as it applies them (the server fills in its defaults): one "
    "field per field of MethodOptions, enums by name.",
    _OPTIONS_CONVERTED,
    base=_Settings,
)
RunStopping = wire_dataclass(
    "RunStopping",
    optimize_pb2.StopCriteria,
    "A run's stopping criteria as it obeys them (the server fills in its defaults): one "
    "field per field of StopCriteria.",
    _STOPPING_CONVERTED,
    base=_Settings,
)


@dataclasses.dataclass(frozen=True, eq=False)  # _Result's equality
class RunInfo(_Result):
    """A run's state: status, stop reason, method, counts, times and the last record."""

    run_id: str
    name: str
    status: RunStatus  # type: ignore[valid-type]
    stop_reason: StopReason | None  # type: ignore[valid-type]
    converged: bool
    message: str
    problem_id: str
    method: Method | None  # type: ignore[valid-type]
    method_note: str
    backend: str
    num_records: int
    last_record: StepRecord | None  # None until the first record exists
    max_iterations: int | None
    options: RunOptions  # type: ignore[valid-type]  # as applied (defaults filled in)
    stopping: RunStopping  # type: ignore[valid-type]
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    final_params: Any = None
    # the record final_params belong to: its latest checkpoint's (a running or interrupted
    # run's later records may have passed it); None without final_params
    params_iteration: int | None = None
    raw: WireRunInfo = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """Whether the run has stopped (finished, cancelled, failed or interrupted)."""
        return self.status in FINAL_STATUSES

    @classmethod
    def from_wire(cls, msg: WireRunInfo, like: Any = None) -> RunInfo:
        """The typed info of a wire RunInfo (or a response copying it); final parameters as
        the type of `like`."""
        params = None
        if msg.HasField("final_params"):
            params = tensors.like_input(tensors.decode(msg.final_params), like)
        stopping = msg.stopping
        return cls(
            run_id=msg.run_id,
            name=msg.name,
            status=RunStatus(service_pb2.RunStatus.Name(msg.status).removeprefix("RUN_STATUS_")),
            stop_reason=_label(
                StopReason, optimize_pb2.StopReason, "STOP_REASON_", msg.stop_reason
            ),
            converged=msg.converged,
            message=msg.message,
            problem_id=msg.problem_id,
            method=_label(Method, optimize_pb2.Method, "METHOD_", msg.method or msg.options.method),
            method_note=msg.method_note,
            backend=msg.backend,
            num_records=int(msg.num_records),
            last_record=StepRecord.from_wire(msg.last_record) if msg.num_records else None,
            max_iterations=(
                int(stopping.max_iterations) if stopping.HasField("max_iterations") else None
            ),
            options=RunOptions(**wire_values(msg.options, _OPTIONS_CONVERTED)),
            stopping=RunStopping(**wire_values(msg.stopping, _STOPPING_CONVERTED)),
            created_at=_time(msg.created_at),
            started_at=_time(msg.started_at),
            finished_at=_time(msg.finished_at),
            final_params=params,
            params_iteration=int(msg.params_iteration) if params is not None else None,
            raw=msg,
        )


@dataclasses.dataclass(frozen=True, eq=False)  # _Result's equality
class StepResult(_Result):
    """A unary step's new parameters (the type sent: numpy or torch) and its record.

    method is the method that ran (auto resolved); method_note says why auto chose it.
    """

    params: Any
    record: StepRecord
    method: Method | None  # type: ignore[valid-type]
    method_note: str
    raw: service_pb2.StepResponse = dataclasses.field(repr=False, compare=False)


ServerLimits = wire_dataclass(
    "ServerLimits", service_pb2.Limits,
    "What the server accepts and how it runs (the fields of the proto's Limits).",
)  # fmt: skip

_INFO_CONVERTED: dict[str, Conversion] = {
    "limits": (ServerLimits, lambda m: ServerLimits(**wire_values(m.limits))),
}

ServerInfo = wire_dataclass(
    "ServerInfo", service_pb2.ServerInfo,
    "GetServerInfo's answer: versions, backend and why, devices, catalogue, methods, limits.",
    _INFO_CONVERTED, raw=True,
)  # fmt: skip


def server_info(msg: service_pb2.ServerInfo) -> Any:
    """The typed ServerInfo of the wire message (kept as `.raw`)."""
    return ServerInfo(**wire_values(msg, _INFO_CONVERTED), raw=msg)


# negative_tolerance: eigenvalues above -this count as zero (rounding, not curvature)
CurvatureSummary = wire_dataclass(
    "CurvatureSummary", optimize_pb2.CurvatureSummary,
    "The dense curvature matrix's spectrum in brief (the fields of the proto's CurvatureSummary).",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)  # _Result's equality
class HessianResult(_Result):
    """ComputeHessian's answer; matrix and gradient as the type the parameters were sent as."""

    matrix: Any
    summary: CurvatureSummary
    loss: float
    gradient: Any
    backend: str
    raw: service_pb2.ComputeHessianResponse = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_wire(cls, msg: service_pb2.ComputeHessianResponse, like: Any) -> HessianResult:
        """The typed answer; tensors converted like `like` (numpy or torch)."""
        matrix = None
        if msg.HasField("matrix"):
            matrix = tensors.like_input(tensors.decode(msg.matrix), like)
        summary = CurvatureSummary(**wire_values(msg.summary))
        gradient = tensors.like_input(tensors.decode(msg.gradient), like)
        return cls(matrix, summary, msg.loss, gradient, msg.backend, msg)


@dataclasses.dataclass(frozen=True, eq=False)  # _Result's equality
class RunResult(_Result):
    """A finished run: its final info and final parameters (the shape and type sent)."""

    info: RunInfo
    params: Any

    @property
    def status(self) -> str:
        """The run's status name (FINISHED, CANCELLED, ...)."""
        return self.info.status

    @property
    def stop_reason(self) -> StopReason | None:  # type: ignore[valid-type]
        """Why it stopped (gradient_tolerance, max_iterations, ...: info.stop_reason)."""
        return self.info.stop_reason

    @property
    def converged(self) -> bool:
        """Whether it met the gradient tolerance (info.converged)."""
        return self.info.converged

    @property
    def message(self) -> str:
        """The run's closing message in words (info.message)."""
        return self.info.message


def status_name(info: RunInfo | WireRunInfo) -> str:
    """The run's status as a plain name (QUEUED, RUNNING, FINISHED, ...)."""
    if isinstance(info, RunInfo):
        return info.status
    return service_pb2.RunStatus.Name(info.status).removeprefix("RUN_STATUS_")
