"""The proto is the one source of option names (issue 12 item 3).

The engine keeps its own dataclasses (it imports no protos), so their field names and the
names its enum options accept are compared here with the message descriptors: a field or a
choice added on one side only fails this file. The codec and the client derive their field
lists from the descriptors; a message with every field set round-trips through them.
The run RPCs' own request and response messages copy the messages they replaced field for
field, so the wire did not change (checked on the descriptors and on bytes).
"""

from __future__ import annotations

import random
from dataclasses import fields

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hessian_client import InvalidArgument
from hessian_client.curvature import spectrum_options
from hessian_client.minimize import _Session
from hessian_client.options import choices, method_options, stop_criteria
from hessian_client.proto import optimize_pb2, problem_pb2, service_pb2
from hessian_service.engine import MethodOptions, SpectrumOptions, StopCriteria, ValidationError
from hessian_service.engine import options as engine_options
from hessian_service.engine.analysis import spectrum as engine_spectrum
from hessian_service.engine.objectives import OBJECTIVES
from hessian_service.server import codec

PAIRS = [
    (MethodOptions, optimize_pb2.MethodOptions),
    (StopCriteria, optimize_pb2.StopCriteria),
    (SpectrumOptions, optimize_pb2.SpectrumOptions),
]
# The names each engine enum option accepts, by (message, field): the engine's own tuples.
ENGINE_CHOICES = {
    ("MethodOptions", "method"): engine_options.METHODS,
    ("MethodOptions", "step_policy"): engine_options.STEP_POLICIES,
    ("MethodOptions", "curvature"): engine_options.CURVATURES,
    ("MethodOptions", "backend"): engine_options.BACKENDS,
    ("MethodOptions", "cg_forcing"): engine_options.CG_FORCINGS,
    ("MethodOptions", "hvp_mode"): engine_options.HVP_MODES,
    ("SpectrumOptions", "curvature"): engine_spectrum.CURVATURES,
    ("SpectrumOptions", "backend"): engine_options.BACKENDS,
    ("SpectrumOptions", "hvp_mode"): engine_options.HVP_MODES,
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
    name = wire.DESCRIPTOR.name
    enum_fields = {fd.name for fd in wire.DESCRIPTOR.fields if fd.enum_type is not None}
    assert enum_fields == {field for message, field in ENGINE_CHOICES if message == name}
    for field in enum_fields:
        assert set(choices(field, wire)) == set(ENGINE_CHOICES[name, field]), field


@pytest.mark.parametrize(
    "objective",
    list(problem_pb2.Problem.DESCRIPTOR.oneofs_by_name["objective"].fields),
    ids=lambda fd: fd.name,
)
def test_objective_option_names_are_the_proto_fields(objective):
    cls = OBJECTIVES[objective.name]
    names = set(cls.option_names) - set(cls.server_option_names)
    assert names == set(objective.message_type.fields_by_name)


def test_engine_verdicts_are_the_proto_verdicts():
    wire = {v.name.removeprefix("VERDICT_").lower() for v in optimize_pb2.Verdict.DESCRIPTOR.values}
    assert set(engine_spectrum.VERDICTS) == wire - {"unspecified"}


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


RUN_STATE_RESPONSES = [
    service_pb2.StartRunResponse,
    service_pb2.GetRunResponse,
    service_pb2.CancelRunResponse,
    service_pb2.ResumeRunResponse,
]
RUN_ID_REQUESTS = [
    service_pb2.CancelRunRequest,
    service_pb2.ResumeRunRequest,
    service_pb2.DeleteRunRequest,
]


def test_every_run_rpc_has_its_own_request_and_response():
    methods = service_pb2.DESCRIPTOR.services_by_name["HessianService"].methods_by_name
    for rpc in ("StartRun", "GetRun", "CancelRun", "ResumeRun", "DeleteRun"):
        method = methods[rpc]
        assert (method.input_type.name, method.output_type.name) == (
            f"{rpc}Request",
            f"{rpc}Response",
        )
    assert "RunRequest" not in service_pb2.DESCRIPTOR.message_types_by_name


def _layout(message: type[Message]) -> list[tuple]:
    """What decides a message's wire and its Python API: each field's name, number, type,
    cardinality, presence and the message or enum it holds."""
    return [
        (
            fd.name,
            fd.number,
            fd.type,
            fd.is_repeated,
            fd.has_presence,
            fd.message_type.full_name if fd.message_type else None,
            fd.enum_type.full_name if fd.enum_type else None,
        )
        for fd in message.DESCRIPTOR.fields
    ]


@pytest.mark.parametrize("response", RUN_STATE_RESPONSES, ids=lambda c: c.DESCRIPTOR.name)
def test_run_state_responses_copy_run_info_field_for_field(response):
    assert _layout(response) == _layout(service_pb2.RunInfo)


@pytest.mark.parametrize("request_type", RUN_ID_REQUESTS, ids=lambda c: c.DESCRIPTOR.name)
def test_run_id_requests_keep_the_old_run_request_wire(request_type):
    run_id = ("run_id", 1, FieldDescriptor.TYPE_STRING, False, False, None, None)
    assert _layout(request_type) == [run_id]
    old = b"\n\x05r-abc"  # RunRequest(run_id="r-abc") as clients before issue 12 sent it
    assert request_type.FromString(old).run_id == "r-abc"
    assert request_type(run_id="r-abc").SerializeToString() == old


def _full_run_info(rng: random.Random) -> service_pb2.RunInfo:
    """A RunInfo with every field set, nested options and record included."""
    info = service_pb2.RunInfo(
        run_id="r-1",
        name="n",
        status=service_pb2.RUN_STATUS_FINISHED,
        stop_reason=optimize_pb2.STOP_REASON_GRADIENT_TOLERANCE,
        converged=True,
        message="m",
        problem_id="p-1",
        backend="native",
        num_records=7,
        created_at=1.5,
        started_at=2.5,
        finished_at=3.5,
        method=optimize_pb2.METHOD_NEWTON,
        method_note="why",
        params_iteration=6,
    )
    info.options.CopyFrom(_every_field_set(optimize_pb2.MethodOptions, rng))
    info.stopping.CopyFrom(_every_field_set(optimize_pb2.StopCriteria, rng))
    info.last_record.iteration = 6
    info.last_record.loss = rng.random()
    info.final_params.shape[:] = [2]
    info.final_params.data = bytes(16)
    assert {fd.name for fd, _ in info.ListFields()} == set(
        service_pb2.RunInfo.DESCRIPTOR.fields_by_name
    )
    return info


@pytest.mark.parametrize("response", RUN_STATE_RESPONSES, ids=lambda c: c.DESCRIPTOR.name)
def test_run_state_responses_read_and_write_run_info_bytes(response):
    wire = _full_run_info(random.Random(3)).SerializeToString()
    decoded = response.FromString(wire)  # an old server's RunInfo, read by a new client
    assert decoded.SerializeToString() == wire  # and a new server's answer, read by an old one
    assert decoded.final_params.data == bytes(16) and decoded.options.HasField("damping")


def test_minimize_sorts_every_stop_criterion_into_stopping():
    rng = random.Random(5)
    stopping = _every_field_set(optimize_pb2.StopCriteria, rng)
    options = {fd.name: value for fd, value in stopping.ListFields()}
    options["cg_tolerance"] = 0.25  # a method option stays one
    session = _Session(sum, [0.0], (), True, None, None, "newton_cg", None, None, options, "names")
    start = session.start_request().start
    assert start.stopping == stopping
    assert start.options.cg_tolerance == 0.25 and not start.options.HasField("learning_rate")
