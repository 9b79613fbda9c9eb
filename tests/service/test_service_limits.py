"""Server limits refuse a request before any work is done, with RESOURCE_EXHAUSTED naming the
limit and the field: data-set size, parameter count, dense-Hessian memory, iterations and
concurrent runs per token. Only catalogue objectives exist: nothing resembling code runs."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from conftest import occupy_workers, start_server
from hessian_client import Client, InvalidArgument, ResourceExhausted, problems, status_name
from hessian_client.proto import problem_pb2, service_pb2, service_pb2_grpc
from hessian_client.tensors import encode
from hessian_service.engine.objectives import OBJECTIVES

LONG = {"method": "gradient_descent", "learning_rate": 1e-6, "stopping": {"max_iterations": 10**6}}


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    (tmp / "tokens").write_text("alpha-token\nbeta-token\n")
    handle = start_server(
        tmp / "data",
        auth_token_file=str(tmp / "tokens"),
        max_data_bytes=8000,
        max_params=3000,
        dense_budget_bytes=2**20,
        max_iterations=500,
        max_runs_per_token=2,
    )
    yield handle
    handle.stop(grace=1.0)


def _client(handle, token: str = "alpha-token") -> Client:
    return Client(handle.address, token=token, timeout=30)


def test_data_size_is_refused_before_the_data_is_decoded(limited):
    with _client(limited) as c:
        c.create_problem(problems.mse(np.ones(1000)))  # 8000 bytes: at the limit
        too_big = problems.mse(np.full(1001, math.nan))  # NaN too: refused before decoding
        for call in (
            lambda: c.create_problem(too_big),
            lambda: c.newton_step(too_big, np.zeros(1001)),
            lambda: c.start_run(too_big, np.zeros(1001)),
        ):
            with pytest.raises(ResourceExhausted, match=r"problem\.data.*--max-data-bytes"):
                call()


def test_parameter_count_is_refused_with_the_field(limited):
    with _client(limited) as c:
        with pytest.raises(ResourceExhausted, match=r"problem: 3001 parameters.*3000"):
            c.create_problem(problems.rosenbrock(dim=3001))
        with pytest.raises(ResourceExhausted, match=r"params\.shape.*3000"):
            c.newton_step(problems.mse(np.ones(3)), np.zeros(3001))


def test_dense_hessian_memory_is_refused_at_start_not_at_the_first_iteration(limited):
    big = problems.rosenbrock(dim=400)  # 400^2 x 8 bytes = 1.22 MiB > 1 MiB
    with _client(limited, "beta-token") as c:
        before = {r.run_id for r in c.list_runs()}
        refused = r"options\.dense_budget_bytes.*1\.2 MiB"
        with pytest.raises(ResourceExhausted, match=refused) as run:
            c.start_run(big, np.zeros(400), method="newton")
        for method in ("newton", "saddle_free"):  # one field and message, as StartRun's
            with pytest.raises(ResourceExhausted) as step:
                c.newton_step(big, np.zeros(400), method=method)
            assert (step.value.field, step.value.message) == (run.value.field, run.value.message)
        with pytest.raises(ResourceExhausted, match="dense-Hessian memory budget"):
            c.compute_hessian(big, np.zeros(400), omit_matrix=True)
        assert {r.run_id for r in c.list_runs()} == before, "no run was created"
        run = c.start_run(
            big, np.zeros(400), method="gradient_descent", stopping={"max_iterations": 2}
        )
        assert run.wait(30).status == "FINISHED"


def test_iterations_over_the_limit_are_refused(limited):
    over = r"stopping\.max_iterations: 501.*500"
    with _client(limited) as c, pytest.raises(ResourceExhausted, match=over):
        c.start_run(problems.rosenbrock(), np.zeros(2), stopping={"max_iterations": 501})


def test_a_default_over_a_low_iteration_limit_says_it_is_the_default(tmp_path, capsys):
    """A server with --max-iterations 30: a run given no max_iterations (SDK start_run, or
    the CLI without --max-iterations, which sent its own 100) was refused as "100 is over the
    server limit of 30", a number the caller never gave."""
    from hessian_client.cli import main

    handle = start_server(tmp_path, max_iterations=30)
    try:
        default = (
            "stopping.max_iterations: the default of 100 iterations is over the server limit "
            "of 30: pass stopping.max_iterations <= 30"
        )
        with Client(handle.address, timeout=30) as c:
            with pytest.raises(ResourceExhausted) as err:
                c.start_run(problems.rosenbrock(), np.zeros(2))
            assert err.value.message == default and err.value.field == "stopping.max_iterations"
            with pytest.raises(ResourceExhausted, match=r"max_iterations: 100 is over .* 30$"):
                c.start_run(problems.rosenbrock(), np.zeros(2), stopping={"max_iterations": 100})
            run = c.start_run(problems.rosenbrock(), np.zeros(2), stopping={"max_iterations": 30})
            assert run.wait(30).status == "FINISHED"
        # the CLI's own flag, a usage mistake to mend there (exit 2)
        code = main(["--address", handle.address, "run", "--objective", "rosenbrock"])
        assert (
            code == 2
            and (
                "--max-iterations: the default of 100 iterations is over the server limit of 30: "
                "pass --max-iterations <= 30"
            )
            in capsys.readouterr().err
        )
        # a raw Optimize start leaving max_iterations out is told the same
        from hessian_client.proto import optimize_pb2
        from optimize_stream import Stream

        start = service_pb2.OptimizeStart(
            initial_params=encode(np.ones(3)),
            capabilities=service_pb2.Capabilities(gradient=True),
            options=optimize_pb2.MethodOptions(method=optimize_pb2.METHOD_GRADIENT_DESCENT),
        )
        refused = Stream(handle.address, service_pb2.OptimizeRequest(start=start)).refusal()
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.details() == "start." + default.replace(
            "pass stopping.", "pass start.stopping."
        )
    finally:
        handle.stop(grace=1.0)


def test_concurrent_runs_are_limited_per_token(limited):
    problem = problems.rosenbrock(dim=2)
    long = dict(LONG, stopping={"max_iterations": 500})
    # Both run workers wait on `gate` until the refusal is checked, so the two runs stay
    # QUEUED (live, counted): neither can finish first and free a slot on a slow machine.
    gate = occupy_workers(limited)
    mine, others = [], []
    with _client(limited) as a, _client(limited, "beta-token") as b:
        try:
            mine += [a.start_run(problem, np.zeros(2), **long) for _ in range(2)]
            with pytest.raises(ResourceExhausted, match="max_runs_per_token"):
                a.start_run(problem, np.zeros(2), **long)
            others.append(b.start_run(problem, np.zeros(2), **long))  # another token: not affected
            assert status_name(a.get_run(mine[0].id)) == "QUEUED"
            mine[0].cancel()
            gate.set()  # the cancelled run needs a worker to end
            mine[0].wait(30)
            # a run is no longer live (nor counted) before its watchers learn its end
            assert limited.runs.live(mine[0].id) is None
            mine.append(a.start_run(problem, np.zeros(2), **long))  # a slot came free
        finally:
            gate.set()
            for run in [*mine, *others]:
                run.cancel()
                run.wait(30)


def test_only_catalogue_objectives_exist_and_code_is_never_run(limited, tmp_path):
    oneof = problem_pb2.Problem.DESCRIPTOR.oneofs_by_name["objective"]
    assert {f.name for f in oneof.fields} == set(OBJECTIVES)
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    x, y = encode(np.ones((4, 2))), encode(np.ones((4, 1)))
    smuggled = problem_pb2.Problem.FromString(
        problem_pb2.Problem(data={"X": x}).SerializeToString()
        + b"\xfa\x01"  # field 31, length-delimited: an objective the catalogue does not have
        + bytes([len(payload)])
        + payload.encode()
    )
    cases = [
        (smuggled, "problem.objective"),
        (problems.mlp(np.ones((4, 2)), np.ones((4, 1)), layer_sizes=[2, 1], activation=payload),
         "problem.mlp.activation"),
        (problem_pb2.Problem(mlp=problem_pb2.MlpObjective(layer_sizes=[2, 1], loss=payload),
                             data={"X": x, "y": y}), "problem.mlp.loss"),
    ]  # fmt: skip
    with grpc.insecure_channel(limited.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        auth = (("authorization", "Bearer alpha-token"),)
        for problem, field in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateProblem(service_pb2.CreateProblemRequest(problem=problem), metadata=auth)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details().startswith(field), err.value.details()
    assert not marker.exists()
    with _client(limited) as c, pytest.raises(InvalidArgument):
        c.create_problem(cases[1][0])
