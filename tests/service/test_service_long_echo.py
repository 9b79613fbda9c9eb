"""An error that echoes a 20 KB input (run id, page token, problem id, data name) keeps its
status code and field name and clips the echo to a few hundred characters, saying how long
the input was; unclipped, the message exceeded gRPC's metadata limit and the caller got
"metadata exceeds hard limit" instead of the answer."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hessian_client import problems, tensors
from hessian_client.proto import service_pb2

LONG = "r" * 20_000
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _named_data() -> service_pb2.CreateProblemRequest:
    problem = problems.mse(np.ones(2))
    problem.data[LONG].CopyFrom(tensors.encode(np.ones(2)))
    return service_pb2.CreateProblemRequest(problem=problem)


CASES = {
    "GetRun": (lambda s: s.GetRun(service_pb2.GetRunRequest(run_id=LONG), timeout=10), NOT_FOUND),
    "CancelRun": (
        lambda s: s.CancelRun(service_pb2.CancelRunRequest(run_id=LONG), timeout=10),
        NOT_FOUND,
    ),
    "DeleteRun": (
        lambda s: s.DeleteRun(service_pb2.DeleteRunRequest(run_id=LONG), timeout=10),
        NOT_FOUND,
    ),
    "ResumeRun": (
        lambda s: s.ResumeRun(service_pb2.ResumeRunRequest(run_id=LONG), timeout=10),
        NOT_FOUND,
    ),
    "WatchRun": (
        lambda s: list(s.WatchRun(service_pb2.WatchRunRequest(run_id=LONG), timeout=10)),
        NOT_FOUND,
    ),
    "ListRuns.page_token": (
        lambda s: s.ListRuns(service_pb2.ListRunsRequest(page_token=LONG), timeout=10),
        INVALID,
    ),
    "NewtonStep.problem_id": (
        lambda s: s.NewtonStep(
            service_pb2.StepRequest(problem_id=LONG, params=tensors.encode(np.zeros(2))),
            timeout=10,
        ),
        NOT_FOUND,
    ),
    "CreateProblem.data name": (lambda s: s.CreateProblem(_named_data(), timeout=10), INVALID),
}
NOT_ECHOED = {"ListRuns.page_token"}  # a page token is never echoed (codec.decode_page_token)
FIELDS = {
    "ListRuns.page_token": "page_token",
    "NewtonStep.problem_id": "problem_id",
    "CreateProblem.data name": "problem.data.rrrr",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_20_kb_echo_is_clipped_and_keeps_its_status(stub, case):
    call, code = CASES[case]
    with pytest.raises(grpc.RpcError) as caught:
        call(stub)
    details = caught.value.details()
    assert caught.value.code() == code, details
    assert details.startswith(FIELDS.get(case, "run_id")), details[:80]
    assert len(details) < 400, len(details)
    if case in NOT_ECHOED:
        assert LONG[:20] not in details, details
    else:
        assert "... (200" in details, details[-80:]  # the echo's full length, ~20 000 characters
