"""Every kind of bad input gets its status code and a message naming the field; the server
stays healthy. Requests are built as raw messages, the way a buggy or hostile caller would."""

from __future__ import annotations

import base64
import math
import threading

import grpc
import numpy as np
import pytest
from conftest import health_status
from grpc_health.v1 import health_pb2
from hessian_client import Client, DeadlineExceeded, InvalidArgument, problems
from hessian_client.proto import optimize_pb2, problem_pb2, service_pb2, tensor_pb2
from hessian_client.tensors import encode
from hessian_service.server import service

INVALID = grpc.StatusCode.INVALID_ARGUMENT
HANG_GUARD = 120  # seconds; only guards a held step against a hang


def _target():
    return encode(np.arange(6, dtype=np.float64).reshape(2, 3))


def _mse(target=None) -> problem_pb2.Problem:
    return problem_pb2.Problem(mse=problem_pb2.MseObjective(), data={"target": target or _target()})


def _params(n=6, dtype=tensor_pb2.DTYPE_FLOAT64, data=None):
    raw = np.zeros(n, dtype="<f8" if dtype == tensor_pb2.DTYPE_FLOAT64 else "<f4").tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=[n], data=raw if data is None else data)


def _softmax_bad_labels() -> problem_pb2.Problem:
    x = encode(np.random.default_rng(0).standard_normal((5, 2)))
    labels = encode(np.array([0, 1, 2, 5, 1], dtype=np.int64))
    return problem_pb2.Problem(
        softmax_regression=problem_pb2.SoftmaxRegressionObjective(num_classes=3),
        data={"X": x, "labels": labels},
    )


NAN_TARGET = encode(np.array([[0.0, math.nan, 1.0]]))
UNKNOWN_OBJECTIVE = problem_pb2.Problem.FromString(
    problem_pb2.Problem(data={"target": _target()}).SerializeToString() + b"\xfa\x01\x00"
)  # field 31, an objective this server's catalogue does not have

CASES = {
    "wrong byte length": (
        "NewtonStep",
        service_pb2.StepRequest(problem=_mse(), params=_params(data=b"\x00" * 47)),
        INVALID,
        "params.data",
    ),
    "NaN in params": (
        "NewtonStep",
        service_pb2.StepRequest(
            problem=_mse(), params=encode(np.array([0, 1, math.nan, 0, 0, 0.0]))
        ),
        INVALID,
        "params",
    ),
    "NaN in data": (
        "GradientStep",
        service_pb2.StepRequest(problem=_mse(NAN_TARGET), params=_params(3)),
        INVALID,
        "problem.data.target",
    ),
    "shape mismatch": (
        "NewtonStep",
        service_pb2.StepRequest(problem=_mse(), params=_params(5)),
        INVALID,
        "params",
    ),
    "unset dtype": (
        "NewtonStep",
        service_pb2.StepRequest(problem=_mse(), params=_params(dtype=0, data=b"")),
        INVALID,
        "params.dtype",
    ),
    "integer params": (
        "NewtonStep",
        service_pb2.StepRequest(
            problem=_mse(),
            params=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[6], data=bytes(48)),
        ),
        INVALID,
        "params.dtype",
    ),
    "negative shape": (
        "NewtonStep",
        service_pb2.StepRequest(
            problem=_mse(),
            params=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[-6], data=b""),
        ),
        INVALID,
        "params.shape",
    ),
    "unknown objective": (
        "NewtonStep",
        service_pb2.StepRequest(problem=UNKNOWN_OBJECTIVE, params=_params()),
        INVALID,
        "problem.objective",
    ),
    "no problem": (
        "NewtonStep",
        service_pb2.StepRequest(params=_params()),
        INVALID,
        "problem",
    ),
    "lr = 0": (
        "GradientStep",
        service_pb2.StepRequest(
            problem=_mse(), params=_params(), options=optimize_pb2.MethodOptions(learning_rate=0)
        ),
        INVALID,
        "options.learning_rate",
    ),
    "lr < 0": (
        "StartRun",
        service_pb2.StartRunRequest(
            problem=_mse(), options=optimize_pb2.MethodOptions(learning_rate=-1.0)
        ),
        INVALID,
        "options.learning_rate",
    ),
    "label out of range": (
        "CreateProblem",
        service_pb2.CreateProblemRequest(problem=_softmax_bad_labels()),
        INVALID,
        "problem.data.labels",
    ),
    "Newton method on GradientStep": (
        "GradientStep",
        service_pb2.StepRequest(
            problem=_mse(),
            params=_params(),
            options=optimize_pb2.MethodOptions(method=optimize_pb2.METHOD_NEWTON),
        ),
        INVALID,
        "options.method",
    ),
    "unknown enum value": (
        "NewtonStep",
        service_pb2.StepRequest(
            problem=_mse(), params=_params(), options=optimize_pb2.MethodOptions(step_policy=42)
        ),
        INVALID,
        "options.step_policy",
    ),
    "negative damping": (
        "NewtonStep",
        service_pb2.StepRequest(
            problem=_mse(), params=_params(), options=optimize_pb2.MethodOptions(damping=-1)
        ),
        INVALID,
        "options.damping",
    ),
    "bad option of an objective": (
        "CreateProblem",
        service_pb2.CreateProblemRequest(
            problem=problem_pb2.Problem(rosenbrock=problem_pb2.RosenbrockObjective(dim=1))
        ),
        INVALID,
        "problem.rosenbrock.dim",
    ),
    "negative stopping tolerance": (
        "StartRun",
        service_pb2.StartRunRequest(
            problem=_mse(), stopping=optimize_pb2.StopCriteria(gradient_tolerance=-1)
        ),
        INVALID,
        "stopping.gradient_tolerance",
    ),
    "iterations over the limit": (
        "StartRun",
        service_pb2.StartRunRequest(
            problem=_mse(), stopping=optimize_pb2.StopCriteria(max_iterations=10**9)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "stopping.max_iterations",
    ),
    "too many parameters": (
        "CreateProblem",
        service_pb2.CreateProblemRequest(
            problem=problem_pb2.Problem(rosenbrock=problem_pb2.RosenbrockObjective(dim=60_000))
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "problem",
    ),
    "dense Hessian over the budget": (
        "NewtonStep",
        service_pb2.StepRequest(
            problem=_mse(),
            params=_params(),
            options=optimize_pb2.MethodOptions(dense_budget_bytes=100),
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "budget",
    ),
    "non-positive dense budget": (
        "NewtonStep",
        service_pb2.StepRequest(
            problem=_mse(),
            params=_params(),
            options=optimize_pb2.MethodOptions(dense_budget_bytes=-5),
        ),
        INVALID,
        "options.dense_budget_bytes",
    ),
    "unknown problem id": (
        "NewtonStep",
        service_pb2.StepRequest(problem_id="p-unknown", params=_params()),
        grpc.StatusCode.NOT_FOUND,
        "problem_id",
    ),
    "unknown run id": (
        "GetRun",
        service_pb2.GetRunRequest(run_id="r-unknown"),
        grpc.StatusCode.NOT_FOUND,
        "run_id",
    ),
    "cancel unknown run": (
        "CancelRun",
        service_pb2.CancelRunRequest(run_id="r-unknown"),
        grpc.StatusCode.NOT_FOUND,
        "run_id",
    ),
    "bad page token": (
        "ListRuns",
        service_pb2.ListRunsRequest(page_token="not-a-token"),
        INVALID,
        "page_token",
    ),
    "page token whose time overflows a float": (
        "ListRuns",
        service_pb2.ListRunsRequest(
            page_token=base64.urlsafe_b64encode(b"[1" + b"0" * 400 + b', "x"]').decode()
        ),
        INVALID,
        "page_token",
    ),
    # an empty id is a request that forgot it (NOT_FOUND "no run with id ''" before)
    **{
        f"empty id in {method}": (method, request, INVALID, field)
        for method, request, field in [
            ("GetRun", service_pb2.GetRunRequest(run_id=""), "run_id"),
            ("CancelRun", service_pb2.CancelRunRequest(run_id=""), "run_id"),
            ("ResumeRun", service_pb2.ResumeRunRequest(run_id=""), "run_id"),
            ("DeleteRun", service_pb2.DeleteRunRequest(run_id=""), "run_id"),
            ("DeleteProblem", service_pb2.DeleteProblemRequest(problem_id=""), "problem_id"),
            (
                "NewtonStep",
                service_pb2.StepRequest(problem_id="", params=_params()),
                "problem_id",
            ),
            (
                "StartRun",
                service_pb2.StartRunRequest(problem_id="", initial_params=_params()),
                "problem_id",
            ),
        ]
    },
    # a NUL in an id: NOT_FOUND on SQLite, UNAVAILABLE (the store blamed, retried) on
    # PostgreSQL, whose text refuses it
    **{
        f"NUL in the id of {method}": (method, request, INVALID, field)
        for method, request, field in [
            ("GetRun", service_pb2.GetRunRequest(run_id="r-a\x00b"), "run_id"),
            ("CancelRun", service_pb2.CancelRunRequest(run_id="r-a\x00b"), "run_id"),
            ("ResumeRun", service_pb2.ResumeRunRequest(run_id="r-a\x00b"), "run_id"),
            ("DeleteRun", service_pb2.DeleteRunRequest(run_id="r-a\x00b"), "run_id"),
            ("DeleteProblem", service_pb2.DeleteProblemRequest(problem_id="p-\x00"), "problem_id"),
            (
                "StartRun",
                service_pb2.StartRunRequest(problem_id="p-\x00", initial_params=_params()),
                "problem_id",
            ),
        ]
    },
    # control characters in a name (a listing printed them to an admin's terminal)
    **{
        f"run name with {label}": (
            "StartRun",
            service_pb2.StartRunRequest(
                problem=_mse(), initial_params=_params(), name=f"run{char}forged"
            ),
            INVALID,
            "name",
        )
        for label, char in [("an escape", "\x1b[2J"), ("a newline", "\r\n"), ("NUL", "\x00")]
    },
    # a page token naming a run id with a NUL: UNAVAILABLE on PostgreSQL (its text)
    "page token with a NUL in its run id": (
        "ListRuns",
        service_pb2.ListRunsRequest(
            page_token=base64.urlsafe_b64encode(b'[1.0, "r-a\\u0000b"]').decode()
        ),
        INVALID,
        "page_token",
    ),
    # two starting points: init was ignored, silently (the SDK refuses the same pair)
    "start with both initial_params and init": (
        "StartRun",
        service_pb2.StartRunRequest(
            problem=_mse(), initial_params=_params(), init=optimize_pb2.Initializer(seed=3)
        ),
        INVALID,
        "init",
    ),
    # the curvature it has no form of, before the size of the matrix it would answer
    "gauss-newton of a large rosenbrock": (
        "ComputeHessian",
        service_pb2.ComputeHessianRequest(
            problem=problem_pb2.Problem(rosenbrock=problem_pb2.RosenbrockObjective(dim=40_000)),
            params=encode(np.zeros(40_000)),
            curvature=optimize_pb2.CURVATURE_GAUSS_NEWTON,
        ),
        INVALID,
        "curvature",
    ),
    "sample with a bad dtype": (
        "SampleTensors",
        service_pb2.SampleTensorsRequest(
            tensors=[optimize_pb2.TensorSpec(shape=[2], dtype=tensor_pb2.DTYPE_INT64)]
        ),
        INVALID,
        "tensors[0].dtype",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_its_code_and_names_the_field(server, stub, case):
    method, request, code, field = CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert field in err.value.details()
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING


def test_a_params_dtype_refusal_lists_only_what_params_may_be(stub):
    """Parameters are FLOAT32 or FLOAT64: the refusal does not offer INT64 (data may be
    INT64, parameters never; a review finding)."""
    for dtype, name in ((0, "got UNSPECIFIED"), (tensor_pb2.DTYPE_INT64, "got INT64")):
        request = CASES["integer params"][1]
        request.params.dtype = dtype
        with pytest.raises(grpc.RpcError) as err:
            stub.NewtonStep(request, timeout=30)
        assert err.value.code() == INVALID
        assert "params.dtype: expected FLOAT32 or FLOAT64" in err.value.details()
        assert name in err.value.details() and "INT64 or" not in err.value.details()


def test_resume_of_a_finished_run_is_failed_precondition(client, stub):
    run = client.start_run(problems.rosenbrock(), stopping={"max_iterations": 3})
    run.wait()
    with pytest.raises(grpc.RpcError) as err:
        stub.ResumeRun(service_pb2.ResumeRunRequest(run_id=run.id), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "INTERRUPTED" in err.value.details()


def test_client_raises_typed_errors_with_code_and_message(client):
    with pytest.raises(InvalidArgument) as err:
        client.gradient_step(problems.mse(np.zeros((2, 2))), np.zeros(3))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "params" in err.value.message


def test_unary_deadline_is_honoured(server, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 20))
    heavy = problems.mlp(x, np.tanh(x[:, :1]), layer_sizes=[20, 40, 1])
    params = rng.standard_normal(20 * 40 + 40 + 40 + 1) * 0.1
    # The heavy step is held in the in-process server until the client has its answer, so
    # no machine is fast enough to answer within the deadline.
    answered = threading.Event()
    real_step = service.take_step

    def held_step(objective, at, *args, **kwargs):
        if at.numel() == params.size:
            answered.wait(HANG_GUARD)
        return real_step(objective, at, *args, **kwargs)

    monkeypatch.setattr(service, "take_step", held_step)
    with Client(server.address) as c:
        # DEADLINE_EXCEEDED (not a late answer) is the proof; no wall-clock bound, since the
        # same process computes the step on a shared machine.
        try:
            with pytest.raises(DeadlineExceeded):
                c.newton_step(heavy, params, timeout=0.05, backend="autograd")
        finally:
            answered.set()
        # The server still answers promptly afterwards.
        assert c.newton_step(problems.mse(np.ones(3)), np.zeros(3), timeout=30).record.loss == 1.0
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in response.list_services_response.service}
    assert {"hessian.v1.HessianService", "grpc.health.v1.Health"} <= names


def test_an_empty_id_to_watch_or_resume_is_invalid_naming_its_field(stub):
    """The streaming calls: WatchRun's run_id and Optimize's resume_run_id."""
    with pytest.raises(grpc.RpcError) as err:
        list(stub.WatchRun(service_pb2.WatchRunRequest(run_id=""), timeout=30))
    assert err.value.code() == INVALID
    assert err.value.details().startswith("run_id: expected an id")
    first = service_pb2.OptimizeRequest(resume_run_id="")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Optimize(iter([first]), timeout=30))
    assert err.value.code() == INVALID
    assert err.value.details().startswith("resume_run_id: expected an id")
