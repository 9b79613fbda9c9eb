"""Issue 11 D1, D2, D10: tensors of too many dimensions, forged page tokens and responses that
grow with the request are refused up front, naming the field, instead of failing as INTERNAL or
as gRPC's anonymous "Sent message larger than max" after the work was done."""

from __future__ import annotations

import base64
import math
import random

import grpc
import numpy as np
import pytest
import torch
from conftest import start_server
from hessian_client import Client, InvalidArgument, ResourceExhausted, problems
from hessian_client.proto import (
    optimize_pb2,
    problem_pb2,
    service_pb2,
    service_pb2_grpc,
    tensor_pb2,
)
from hessian_service.engine.errors import ValidationError
from hessian_service.server import codec
from hessian_service.server import service as service_module

MiB = 1024**2
SMALL = 32 * 1024  # a message limit that 512 records, or 60 runs with long names, outgrow
FLOAT64 = tensor_pb2.DTYPE_FLOAT64
ROSENBROCK = problem_pb2.Problem(rosenbrock=problem_pb2.RosenbrockObjective(dim=2))


@pytest.fixture(scope="module")
def mib_server(tmp_path_factory):
    handle = start_server(tmp_path_factory.mktemp("mib"), max_message_bytes=MiB, max_params=2**18)
    yield handle
    handle.stop(grace=1.0)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    handle = start_server(tmp_path_factory.mktemp("small"), max_message_bytes=SMALL)
    yield handle
    handle.stop(grace=1.0)


def _stub(handle) -> tuple[grpc.Channel, service_pb2_grpc.HessianServiceStub]:
    # the client side may receive more than the server sends: an over-size answer would arrive
    big = [("grpc.max_receive_message_length", 64 * MiB)]
    channel = grpc.insecure_channel(handle.address, options=big)
    return channel, service_pb2_grpc.HessianServiceStub(channel)


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _tensor(shape: list[int]) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=FLOAT64, shape=shape, data=b"\0" * 8 * math.prod(shape))


# D1: rank
def _rank_cases(shape: list[int]) -> dict[str, tuple[str, object]]:
    """{field: (rpc, request)} with a tensor of `shape` in every tensor field of the API."""
    data = problem_pb2.Problem(mse=problem_pb2.MseObjective(), data={"target": _tensor(shape)})
    return {
        "params": (
            "NewtonStep",
            service_pb2.StepRequest(problem=ROSENBROCK, params=_tensor(shape)),
        ),
        "problem.data.target": (
            "CreateProblem",
            service_pb2.CreateProblemRequest(problem=data),
        ),
        "initial_params": (
            "StartRun",
            service_pb2.StartRunRequest(problem=ROSENBROCK, initial_params=_tensor(shape)),
        ),
        "tensors[0]": (
            "SampleTensors",
            service_pb2.SampleTensorsRequest(
                tensors=[optimize_pb2.TensorSpec(shape=shape, dtype=FLOAT64)]
            ),
        ),
        "params ": (
            "ComputeHessian",
            service_pb2.ComputeHessianRequest(problem=ROSENBROCK, params=_tensor(shape)),
        ),
        "params  ": (
            "AnalyzeCurvature",
            service_pb2.AnalyzeCurvatureRequest(problem=ROSENBROCK, params=_tensor(shape)),
        ),
    }


@pytest.mark.parametrize("rank", [codec.MAX_RANK + 1, 65, 200])
def test_a_tensor_of_too_many_dimensions_is_invalid_argument_naming_its_field(mib_server, rank):
    channel, stub = _stub(mib_server)
    with channel:
        for field, (rpc, request) in _rank_cases([2] + [1] * (rank - 1)).items():
            err = _refusal(lambda rpc=rpc, request=request: getattr(stub, rpc)(request, timeout=30))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, err.details())
            expected = f"{field.strip()}.shape: expected at most {codec.MAX_RANK} dimensions"
            assert err.details().startswith(expected), (rpc, err.details())


def test_a_tensor_of_the_largest_rank_is_accepted(mib_server):
    shape = [1] * (codec.MAX_RANK - 1) + [3]
    with Client(mib_server.address, timeout=30) as c:
        drawn = c.sample(11, [shape], dtype="float64")[0]
    reference = torch.rand(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert drawn.shape == tuple(shape)
    np.testing.assert_array_equal(drawn, reference.numpy())  # torch's draws, bit for bit


# D2: page tokens
def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


FORGED_TOKENS = {
    "nested 100000 deep": _b64(b"[" * 100_000 + b"]" * 100_000),
    "nested 150 deep (within the length bound)": _b64(b"[" * 150 + b"]" * 150),
    "nested object": _b64(b'{"a":' * 90 + b"1" + b"}" * 90),
    "20 KB": "A" * 20_000,
    "not base64": "%%%%",
    "base64 with junk inside": "WzEuMCwgIngiXQ==!",
    "not JSON": _b64(b"\xff\xfe"),
    "three items": _b64(b'[1.0, "r-1", 3]'),
    "a string time": _b64(b'["1.0", "r-1"]'),
    "an integer time": _b64(b'[1, "r-1"]'),
    "a bool time": _b64(b'[true, "r-1"]'),
    "NaN time": _b64(b'[NaN, "r-1"]'),
    "infinite time": _b64(b'[1e999, "r-1"]'),
    "huge integer": _b64(b"[" + b"9" * 300 + b', "r-1"]'),
    "a number id": _b64(b"[1.0, 5]"),
    "an object": _b64(b'{"created": 1.0}'),
    "non-ASCII": "Wz\u00e9xIl0=",
}


@pytest.mark.parametrize("token", FORGED_TOKENS.values(), ids=FORGED_TOKENS.keys())
def test_a_forged_page_token_is_invalid_argument_naming_page_token(mib_server, token):
    channel, stub = _stub(mib_server)
    with channel:
        err = _refusal(lambda: stub.ListRuns(service_pb2.ListRunsRequest(page_token=token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("page_token: expected a next_page_token returned by ListRuns")
    assert len(err.details()) < 200  # the token is not echoed


def test_page_tokens_round_trip_exactly():
    rng = random.Random(5)
    for _ in range(200):
        created = rng.uniform(0, 4e9)
        run_id = "r-" + "".join(rng.choices("0123456789abcdef", k=32))
        assert codec.decode_page_token(codec.encode_page_token(created, run_id)) == (
            created,
            run_id,
        )
    with pytest.raises(ValidationError, match="page_token"):
        codec.decode_page_token(codec.encode_page_token(1.0, "r-" + "x" * codec.MAX_NAME_CHARS))


# D10: SampleTensors
def _counting_sample(monkeypatch) -> list:
    calls: list = []
    real = service_module.sample

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "sample", counting)
    return calls


def test_the_advertised_sample_limit_is_served_and_one_more_refused_before_drawing(
    mib_server, monkeypatch
):
    calls = _counting_sample(monkeypatch)
    with Client(mib_server.address, timeout=60, max_message_bytes=64 * MiB) as c:
        limit = c.info().limits.max_sample_elements
        assert limit == (MiB - service_module.SAMPLE_HEADER_BYTES) // 8
        drawn = c.sample(3, [[limit]], dtype="float64")[0]
        gen = torch.Generator().manual_seed(3)
        np.testing.assert_array_equal(drawn, torch.rand(limit, generator=gen, dtype=torch.float64))
        assert len(calls) == 1
        # 16 tensors of the largest rank, together exactly at the limit, fit as well
        sizes = [limit // 16] * 15 + [limit - 15 * (limit // 16)]
        shapes = [[1] * (codec.MAX_RANK - 1) + [k] for k in sizes]
        assert sum(t.size for t in c.sample(4, shapes, dtype="float64")) == limit
        assert len(calls) == 2
    channel, stub = _stub(mib_server)
    with channel:
        over = service_pb2.SampleTensorsRequest(
            tensors=[optimize_pb2.TensorSpec(shape=[limit - 1], dtype=FLOAT64)] * 2
        )
        err = _refusal(lambda: stub.SampleTensors(over, timeout=30))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details().startswith(f"tensors[1].shape: {2 * limit - 2} values requested")
        # at the value limit, but with headers (empty tensors of the largest rank) that no
        # message can hold beside the values: refused naming the field, before any draw
        empty = optimize_pb2.TensorSpec(shape=[0] * codec.MAX_RANK, dtype=FLOAT64)
        headers = service_pb2.SampleTensorsRequest(
            tensors=[optimize_pb2.TensorSpec(shape=[limit], dtype=FLOAT64)] + [empty] * 200
        )
        err = _refusal(lambda: stub.SampleTensors(headers, timeout=30))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details().startswith("tensors: 201 tensors of")
        assert "over the message limit of 1048576" in err.details()
        # many empty tensors: a small request, each a draw's setup (1e6 of them took 25 s)
        many = service_pb2.SampleTensorsRequest(
            tensors=[optimize_pb2.TensorSpec(shape=[0], dtype=FLOAT64)] * 1025
        )
        err = _refusal(lambda: stub.SampleTensors(many, timeout=30))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details().startswith("tensors: 1025 tensors requested, over the limit of 1024")
        at_limit = service_pb2.SampleTensorsRequest(tensors=many.tensors[:1024])
        assert len(stub.SampleTensors(at_limit, timeout=30).tensors) == 1024
    assert len(calls) == 3, "the refused requests drew nothing"


# D10 audit: every response that grows with the request
def test_compute_hessian_counts_the_gradient_beside_the_matrix(mib_server):
    channel, stub = _stub(mib_server)
    with channel:

        def request(n: int) -> service_pb2.ComputeHessianRequest:
            problem = problem_pb2.Problem(rosenbrock=problem_pb2.RosenbrockObjective(dim=n))
            return service_pb2.ComputeHessianRequest(problem=problem, params=_tensor([n]))

        # 362^2 x 8 bytes fit alone, but not with the 362 gradient values beside them
        err = _refusal(lambda: stub.ComputeHessian(request(362), timeout=60))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details().startswith("omit_matrix: a 362x362 matrix"), err.details()
        answer = stub.ComputeHessian(request(361), timeout=60)
        assert list(answer.matrix.shape) == [361, 361]
        assert answer.ByteSize() <= MiB


def test_a_step_whose_answer_is_wider_than_its_request_is_refused_naming_params(mib_server):
    n = 131_000  # float32 parameters of float64 data come back as float64: twice the bytes
    with Client(mib_server.address, timeout=60, max_message_bytes=64 * MiB) as c:
        pid = c.create_problem(problems.mse(np.ones(n)))
        params = np.zeros(n, dtype=np.float32)
        with pytest.raises(ResourceExhausted) as info:
            c.gradient_step(pid, params)
        assert info.value.message.startswith("params: the new parameters would take")
        # a float64 step whose request and answer are just under the limit is served
        n = 130_900
        pid = c.create_problem(problems.mse(np.ones(n)))
        step = c.gradient_step(pid, np.zeros(n), learning_rate=0.5)
        np.testing.assert_allclose(step.params, np.full(n, 1.0 / n), rtol=1e-12)


def test_get_run_with_parameters_over_the_message_limit_names_include_params(mib_server):
    n = 131_100  # 1,048,800 bytes of float64 parameters: over the 1 MiB message
    with Client(mib_server.address, timeout=60, max_message_bytes=64 * MiB) as c:
        run = c.start_run(
            problems.rosenbrock(dim=n),
            seed=1,
            method="gradient_descent",
            learning_rate=1e-6,
            stopping={"max_iterations": 1},
        )
        assert run.wait(60).status == "FINISHED"
        with pytest.raises(ResourceExhausted) as info:
            c.get_run(run.id, include_params=True)
        assert info.value.message.startswith("include_params: the run's parameters would take")
        assert c.get_run(run.id).final_params is None


def test_watch_run_events_fit_a_small_message_limit(small_server):
    iterations = 600  # 512 records of ~110 bytes each would make a 56 KB event
    with Client(small_server.address, timeout=60) as c:
        run = c.start_run(
            problems.rosenbrock(dim=2),
            np.zeros(2),
            method="gradient_descent",
            learning_rate=1e-5,
            stopping={"max_iterations": iterations},
        )
        assert run.wait(120).status == "FINISHED"
    channel, stub = _stub(small_server)
    with channel:
        events = list(stub.WatchRun(service_pb2.WatchRunRequest(run_id=run.id), timeout=60))
    iterations_seen = [r.iteration for e in events for r in e.records]
    assert iterations_seen == list(range(iterations + 1))  # record 0: the starting point
    assert all(e.ByteSize() <= SMALL for e in events)
    assert events[-1].HasField("final")


def test_list_runs_splits_a_page_that_would_outgrow_the_message_limit(small_server):
    with Client(small_server.address, timeout=60) as c:
        started = []
        for i in range(60):  # ~660 bytes of RunInfo each: 60 of them are over 32 KiB
            name = f"{i:03d}" + "n" * (codec.MAX_NAME_CHARS - 3)
            run = c.start_run(
                problems.rosenbrock(dim=2),
                np.zeros(2),
                name=name,
                method="gradient_descent",
                stopping={"max_iterations": 1},
            )
            started.append(run.id)
        for run_id in started:
            c.get_run(run_id)  # settled before listing
    channel, stub = _stub(small_server)
    seen, pages, token = [], 0, ""
    with channel:
        while True:
            request = service_pb2.ListRunsRequest(page_size=1000, page_token=token)
            page = stub.ListRuns(request, timeout=30)
            assert page.ByteSize() <= SMALL
            seen += [r.run_id for r in page.runs]
            pages += 1
            token = page.next_page_token
            if not token:
                break
    assert pages >= 2, "the page was split"
    assert len(seen) == len(set(seen)), "no run twice"
    assert set(started) <= set(seen)


def test_a_run_name_is_bounded(mib_server):
    with Client(mib_server.address, timeout=30) as c:
        with pytest.raises(InvalidArgument) as info:
            c.start_run(problems.rosenbrock(), np.zeros(2), name="x" * (codec.MAX_NAME_CHARS + 1))
        assert info.value.message.startswith(
            f"name: expected at most {codec.MAX_NAME_CHARS} characters"
        )


def test_analyze_curvature_sizes_only_what_it_will_send(mib_server):
    with Client(mib_server.address, timeout=60) as c:
        # no density: the grid is not sent; Lanczos reports at most its Krylov space
        report = c.analyze_curvature(
            problems.rosenbrock(),
            np.zeros(2),
            density_probes=0,
            grid_points=10**9,
            top_k=10**9,
            bottom_k=10**9,
            trace_samples=0,
        )
        assert 1 <= len(report.top_eigenvalues) <= 2
        with pytest.raises(ResourceExhausted) as info:
            c.analyze_curvature(
                problems.rosenbrock(), np.zeros(2), density_probes=1, grid_points=70_000
            )
        assert info.value.message.startswith("options.grid_points: the report would take")
        assert info.value.message.endswith(
            "over the message limit of 1048576 (--max-message-bytes)"
        )


@pytest.mark.parametrize("shape", [[-1, -5], [-(2**40), -(2**40)], [0, 7]])
def test_an_exported_param_shape_with_sizes_below_1_is_invalid_not_huge(mib_server, shape):
    """Checked for sign before its product is compared with --max-params: two negative
    sizes made a product of 1.2e24 "parameters" (RESOURCE_EXHAUSTED)."""
    channel, stub = _stub(mib_server)
    exported = problem_pb2.ExportedObjective(program=b"x", param_shape=shape)
    request = service_pb2.CreateProblemRequest(problem=problem_pb2.Problem(exported=exported))
    with channel:
        err = _refusal(lambda: stub.CreateProblem(request, timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("problem.exported.param_shape: expected the shape of params")


def test_a_name_whose_run_info_cannot_fit_a_message_is_refused_before_the_run_exists(tmp_path):
    """Under --max-message-bytes 1024 a StartRun of 851 bytes (200 emoji: 800 bytes, within
    the 256-character rule) started the run, answered "Sent message larger than max", and
    every ListRuns failed after it. Now it is refused naming the name, nothing is created,
    and a run whose closing message is long is listed with the message cut to fit."""
    handle = start_server(tmp_path, max_message_bytes=1024)
    try:
        with Client(handle.address, timeout=60) as client:
            for watch in (False, True):
                with pytest.raises(ResourceExhausted) as err:
                    client.start_run(ROSENBROCK, np.zeros(2), name="\U0001f600" * 200, watch=watch)
                assert err.value.field == "name" and "800-byte name" in err.value.message
            assert list(client.list_runs()) == []
            short = client.start_run(ROSENBROCK, np.zeros(2), name="\U0001f600" * 5)
            assert short.wait(60).status == "FINISHED"
            long_message = "x" * 5000
            row = handle.store.get_run(short.id)
            handle.store.update_run(short.id, message=long_message)
            listed = list(client.list_runs())
            assert [r.run_id for r in listed] == [short.id] and row.name == "\U0001f600" * 5
            shown = listed[0].message
            assert shown.endswith(codec.CUT_MARK) and long_message.startswith(shown[:-6])
            assert client.get_run(short.id).message == shown
    finally:
        handle.stop(grace=1.0)
