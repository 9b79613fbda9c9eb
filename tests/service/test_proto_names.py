"""The proto is the one source of option names (issue 12 item 3).

The engine keeps its own dataclasses (it imports no protos), so their field names and the
names its enum options accept are compared here with the message descriptors: a field or a
choice added on one side only fails this file. The codec and the client derive their field
lists from the descriptors; a message with every field set round-trips through them.
"""

from __future__ import annotations

import random
from dataclasses import fields

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hessian_client import InvalidArgument
from hessian_client.curvature import spectrum_options
from hessian_client.options import choices, method_options, stop_criteria
from hessian_client.proto import optimize_pb2
from hessian_service.engine import MethodOptions, SpectrumOptions, StopCriteria, ValidationError
from hessian_service.engine.options import (
    BACKENDS,
    CG_FORCINGS,
    CURVATURES,
    HVP_MODES,
    METHODS,
    STEP_POLICIES,
)
from hessian_service.server import codec

PAIRS = [
    (MethodOptions, optimize_pb2.MethodOptions),
    (StopCriteria, optimize_pb2.StopCriteria),
    (SpectrumOptions, optimize_pb2.SpectrumOptions),
]
ENGINE_CHOICES = {
    "method": METHODS,
    "step_policy": STEP_POLICIES,
    "curvature": CURVATURES,
    "backend": BACKENDS,
    "cg_forcing": CG_FORCINGS,
    "hvp_mode": HVP_MODES,
}
CLIENT_BUILDERS = {
    optimize_pb2.MethodOptions: method_options,
    optimize_pb2.StopCriteria: stop_criteria,
    optimize_pb2.SpectrumOptions: spectrum_options,
}


@pytest.mark.parametrize(("engine", "wire"), PAIRS, ids=lambda c: c.__name__)
def test_engine_option_fields_are_the_proto_fields(engine, wire):
    assert {f.name for f in fields(engine)} == set(wire.DESCRIPTOR.fields_by_name)


@pytest.mark.parametrize("wire", [optimize_pb2.MethodOptions, optimize_pb2.SpectrumOptions])
def test_engine_enum_choices_are_the_proto_enum_values(wire):
    enum_fields = [fd for fd in wire.DESCRIPTOR.fields if fd.enum_type is not None]
    assert enum_fields
    for fd in enum_fields:
        assert set(choices(fd.name, wire)) == set(ENGINE_CHOICES[fd.name]), fd.name


def _every_field_set(wire: type[Message], rng: random.Random) -> Message:
    """`wire` with every field set to a non-default value (enums: a random named value)."""
    msg = wire()
    for fd in wire.DESCRIPTOR.fields:
        if fd.enum_type is not None:
            value = rng.choice(fd.enum_type.values[1:]).number
        elif fd.type == FieldDescriptor.TYPE_DOUBLE:
            value = rng.uniform(0.01, 0.99)
        elif fd.type == FieldDescriptor.TYPE_INT64:
            value = rng.randrange(1, 1000)
        else:
            raise AssertionError(f"{wire.DESCRIPTOR.name}.{fd.name}: a type this test lacks")
        setattr(msg, fd.name, value)
    return msg


@pytest.mark.parametrize("wire", [w for _, w in PAIRS], ids=lambda c: c.DESCRIPTOR.name)
def test_codec_and_client_carry_every_field_of_the_descriptor(wire):
    rng = random.Random(12)
    for _ in range(5):
        msg = _every_field_set(wire, rng)
        values = codec.message_to_dict(msg, "options")
        assert set(values) == set(wire.DESCRIPTOR.fields_by_name)
        assert codec.dict_to_message(values, wire) == msg
        assert CLIENT_BUILDERS[wire](**values) == msg  # the client's keywords: engine names
        assert codec.message_to_dict(wire(), "options") == {}  # unset: the engine's defaults


def test_unknown_keyword_names_the_message_fields():
    with pytest.raises(InvalidArgument) as err:
        method_options(dampign=1.0)
    assert err.value.field == "options"
    assert "damping" in err.value.expected and "gradient_fraction" in err.value.expected


def test_unknown_wire_enum_value_is_refused_naming_the_field():
    msg = optimize_pb2.SpectrumOptions(hvp_mode=99)
    with pytest.raises(ValidationError) as err:
        codec.spectrum_to_dict(msg)
    assert err.value.field == "options.hvp_mode"
    assert "HVP_MODE_FORWARD_OVER_REVERSE" in err.value.expected
