"""Issue 11's hostile-input kinds sent to every RPC of a live server process: tensors of too many
dimensions, wrong dtypes, shape/byte mismatches, NaN/inf, negative and huge integers, unknown
enum values, huge strings, oversized repeated fields, nested page tokens, unknown fields and
messages over the limit (hostile_cases.py builds them from valid requests, field by field).
Not one INTERNAL or UNKNOWN; a refusal names the field; the server answers as before."""

from __future__ import annotations

import collections
import re
import signal

import grpc
import hostile_cases
import pytest
from conftest import free_port, health_status, spawn_server
from grpc_health.v1 import health_pb2
from hessian_client.proto import service_pb2
from hostile_cases import call

MAX_MESSAGE = 1 << 20
LIMITS = (
    "--max-message-bytes", str(MAX_MESSAGE), "--max-params", "256", "--max-data-bytes", "65536",
    "--dense-budget-bytes", "131072", "--max-iterations", "30", "--max-concurrent-runs", "64",
    "--workers", "2",
)  # fmt: skip
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# a refusal of ours starts with the path of the field it concerns ("options.seed: ...")
FIELD_FIRST = re.compile(r"^([a-z_]+)[.\[:]")
# refusals gRPC makes itself, before a handler runs (they name no field of ours)
TRANSPORT = (
    "Received message larger than max",
    "Failed to parse request",
)
TENSOR_RPCS = {
    "CreateProblem",
    "GradientStep",
    "NewtonStep",
    "ComputeHessian",
    "AnalyzeCurvature",
    "Predict",
    "StartRun",
    "StartAndWatchRun",
}
# what the valid requests get: the run they name is FINISHED; DeleteRun's and
# DeleteProblem's name nothing stored
BASE_CODES = {
    "ResumeRun": grpc.StatusCode.FAILED_PRECONDITION,
    "DeleteRun": grpc.StatusCode.NOT_FOUND,
    "DeleteProblem": grpc.StatusCode.NOT_FOUND,
}
RUN_ID_RPCS = {"WatchRun", "GetRun", "CancelRun", "ResumeRun", "DeleteRun"}
ALL_RPCS = {m.name for m in hostile_cases.SERVICE.methods}


def _names_a_field(rpc: str, details: str) -> bool:
    """Whether `details` starts with a field of the RPC's request (or of a run it names)."""
    match = FIELD_FIRST.match(details)
    fields = hostile_cases.SERVICE.methods_by_name[rpc].input_type.fields_by_name
    return match is not None and (match.group(1) in fields or match.group(1) == "run")


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    port = free_port()
    proc = spawn_server(tmp_path_factory.mktemp("hostile"), port, *LIMITS)
    yield proc, f"127.0.0.1:{port}"
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _finished_run(channel: grpc.Channel) -> str:
    """The id of a run started from the StartRun base request, once it has finished."""
    base = hostile_cases.base_requests("", "")["StartRun"][0]
    code, details, raw = call(channel, "StartRun", base.SerializeToString())
    assert code == grpc.StatusCode.OK, details
    run_id = service_pb2.StartRunResponse.FromString(raw).run_id
    request = service_pb2.WatchRunRequest(run_id=run_id).SerializeToString()
    code, details, raw = call(channel, "WatchRun", request)  # ends when the run does
    assert code == grpc.StatusCode.OK, details
    assert service_pb2.WatchRunEvent.FromString(raw).final.status == service_pb2.RUN_STATUS_FINISHED
    return run_id


@pytest.fixture(scope="module")
def results(hostile_server):
    """Every hostile case sent once: [(kind, rpc, what, code, details)], plus the
    NewtonStep base answer before and after them all."""
    proc, address = hostile_server
    with grpc.insecure_channel(address) as channel:
        run_id = _finished_run(channel)
        _finished_run(channel)
        first = service_pb2.ListRunsRequest(page_size=1).SerializeToString()
        code, _, raw = call(channel, "ListRuns", first)
        token = service_pb2.ListRunsResponse.FromString(raw).next_page_token
        assert code == grpc.StatusCode.OK and token
        bases = hostile_cases.base_requests(run_id, token)
        for rpc, requests in bases.items():  # the cases mutate valid requests
            for request in requests:
                code, details, _ = call(channel, rpc, request.SerializeToString())
                assert code == BASE_CODES.get(rpc, grpc.StatusCode.OK), (rpc, details)
        newton = bases["NewtonStep"][0].SerializeToString()
        before = call(channel, "NewtonStep", newton)
        out = []
        for kind, rpc, what, raw in hostile_cases.cases(run_id, token, MAX_MESSAGE):
            code, details, _ = call(channel, rpc, raw)
            out.append((kind, rpc, what, code, details))
            assert proc.poll() is None, f"the server died on {kind} {rpc} {what}"
        after = call(channel, "NewtonStep", newton)
    assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
    counts = collections.Counter((kind, code.name) for kind, _, _, code, _ in out)
    print("hostile inputs by kind and status:", dict(sorted(counts.items())))
    return out, before, after


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", hostile_cases.KINDS)
def test_no_hostile_input_of_a_kind_gets_internal_or_unknown(results, kind):
    out, _, _ = results
    mine = [r for r in out if r[0] == kind]
    assert mine, kind
    bad = [
        (rpc, what, code.name, details[:160])
        for _, rpc, what, code, details in mine
        if code in FORBIDDEN
    ]
    assert not bad, bad
    unnamed = [
        (rpc, what, code.name, details[:160])
        for _, rpc, what, code, details in mine
        if code != grpc.StatusCode.OK
        and not _names_a_field(rpc, details)
        and not any(text in details for text in TRANSPORT)
    ]
    assert not unnamed, f"refusals that name no field: {unnamed}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_kind_reaches_every_rpc_that_has_such_a_field(results):
    out, _, _ = results
    reached = collections.defaultdict(set)
    for kind, rpc, _, _, _ in out:
        reached[kind].add(rpc)
    for kind in ("rank", "mismatch", "nonfinite", "dtype"):
        assert reached[kind] >= TENSOR_RPCS, kind
    assert "SampleTensors" in reached["rank"]
    assert RUN_ID_RPCS | {"StartRun", "StartAndWatchRun", "ListRuns"} <= reached["huge_string"]
    assert reached["page_token"] == {"ListRuns"}
    assert reached["unknown_fields"] == reached["oversized_message"] == ALL_RPCS
    refused = {rpc for kind, rpc, _, code, _ in out if kind == "oversized_message"
               if code == grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
    assert refused == ALL_RPCS


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_server_answers_a_valid_step_exactly_as_before_the_hostile_inputs(results):
    _, before, after = results
    assert before[0] == after[0] == grpc.StatusCode.OK
    first, second = (service_pb2.StepResponse.FromString(r[2]) for r in (before, after))
    assert first.params == second.params, "the same new parameters, byte for byte"
    assert first.record.loss == second.record.loss
