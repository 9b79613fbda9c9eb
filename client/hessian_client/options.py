"""Method options and stopping criteria from plain Python values (engine names as strings).

The option names and the enum choices are read from the proto message descriptors, so a
field added to optimize.proto is accepted here with no edit.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from .errors import invalid
from .proto import optimize_pb2

M = TypeVar("M", bound=Message)
# The stopping criteria's names (minimize() sorts its options by them), from the descriptor.
STOP_FIELDS = tuple(optimize_pb2.StopCriteria.DESCRIPTOR.fields_by_name)


def _enum(field: str, message: type[Message]) -> EnumDescriptor:
    """The enum type of `message`'s field `field`."""
    enum_type = message.DESCRIPTOR.fields_by_name[field].enum_type
    if enum_type is None:
        raise KeyError(f"{message.DESCRIPTOR.name}.{field} is not an enum field")
    return enum_type


def _prefix(enum_type: EnumDescriptor) -> str:
    """The prefix of the enum's value names ("METHOD_" for METHOD_UNSPECIFIED, ...)."""
    return enum_type.values[0].name.removesuffix("UNSPECIFIED")


def choices(field: str, message: type[Message] = optimize_pb2.MethodOptions) -> list[str]:
    """The engine names an enum option accepts, from the proto descriptor."""
    enum_type = _enum(field, message)
    return [v.name.removeprefix(_prefix(enum_type)).lower() for v in enum_type.values[1:]]


def enum_value(
    field: str,
    name: str | None,
    message: type[Message] = optimize_pb2.MethodOptions,
    where: str | None = None,
) -> int:
    """The wire value for an engine name such as "newton" (None: unspecified); a refusal
    names `where` (default `field`), the request's path to it as the server names it."""
    if name is None:
        return 0
    known = choices(field, message)
    if not isinstance(name, str) or name.lower() not in known:
        raise invalid(where or field, f"one of {known}", name)
    enum_type = _enum(field, message)
    return enum_type.values_by_name[_prefix(enum_type) + name.upper()].number


def enum_label(field: str, value: int, message: type[Message] = optimize_pb2.MethodOptions) -> str:
    """The engine name of a wire enum value ("" when unspecified)."""
    return label(_enum(field, message), value)


def label(enum_type: EnumDescriptor, value: int) -> str:
    """The engine name of `enum_type`'s wire value ("newton" for METHOD_NEWTON; "" for 0)."""
    if value == 0:
        return ""
    return enum_type.values_by_number[value].name.removeprefix(_prefix(enum_type)).lower()


def build(message: type[M], what: str, field: str, values: dict[str, Any]) -> M:
    """`message` from keyword values (enum fields by engine name); None leaves a field unset.

    A key the message does not have is refused naming `field` and listing its fields.
    """
    msg = message()
    known = message.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        if value is None:
            continue
        fd = known.get(key)
        if fd is None:
            raise invalid(field, f"{what}, one of {list(known)}", key)
        if fd.enum_type:
            setattr(msg, key, enum_value(key, value, message, f"{field}.{key}"))
            continue
        if isinstance(value, bool) and fd.cpp_type != FieldDescriptor.CPPTYPE_BOOL:
            # protobuf takes True as 1.0 for a double (eigenvalue_floor=True ran as 1.0,
            # learning_rate=False failed as "0.0"); the engine refuses a bool there
            raise invalid(f"{field}.{key}", _KINDS.get(fd.cpp_type, "a value of its type"), value)
        try:
            setattr(msg, key, value)
        except (TypeError, ValueError):  # protobuf's own words name no field
            kind = _KINDS.get(fd.cpp_type, "a value of its type")
            if isinstance(value, int) and fd.cpp_type in WIRE_RANGES:  # an int past the wire's
                low, high = WIRE_RANGES[fd.cpp_type]  # the side it is past (maxiter=2**70
                # quoted a signed range whose lower half the server refuses too)
                kind = f"an integer at most {high}" if value > high else f"an integer >= {low}"
            raise invalid(f"{field}.{key}", kind, value) from None
    return msg


WIRE_RANGES = {  # the wire's integer types
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
}
_KINDS = {
    FieldDescriptor.CPPTYPE_INT64: "an integer",
    FieldDescriptor.CPPTYPE_INT32: "an integer",
    FieldDescriptor.CPPTYPE_UINT64: "an integer",
    FieldDescriptor.CPPTYPE_UINT32: "an integer",
    FieldDescriptor.CPPTYPE_DOUBLE: "a number",
    FieldDescriptor.CPPTYPE_FLOAT: "a number",
    FieldDescriptor.CPPTYPE_BOOL: "a bool",
    FieldDescriptor.CPPTYPE_STRING: "a string",
}


def method_options(**values: Any) -> optimize_pb2.MethodOptions:
    """MethodOptions from keyword arguments; None leaves a field at the server's default."""
    return build(optimize_pb2.MethodOptions, "a method option", "options", values)


def stop_criteria(**values: Any) -> optimize_pb2.StopCriteria:
    """StopCriteria from keyword arguments; None leaves a criterion at the engine default."""
    return build(optimize_pb2.StopCriteria, "a criterion", "stopping", values)
