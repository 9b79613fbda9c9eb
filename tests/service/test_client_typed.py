"""The SDK's typed results, error hierarchy, retries, timeouts, handshake and Predict against a
real server on loopback; references are numpy float64 closed forms or the engine itself."""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from conftest import start_server
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hessian_client import (
    API_VERSION,
    Client,
    DeadlineExceeded,
    HessianError,
    IncompatibleServer,
    InvalidArgument,
    Method,
    RunOptions,
    RunStatus,
    RunStopping,
    StepRecord,
    StopReason,
    Unavailable,
    VersionWarning,
    __version__,
    problems,
)
from hessian_client.client import check_versions
from hessian_client.proto import optimize_pb2, service_pb2, service_pb2_grpc
from long_runs import start_endless_run


def test_step_record_has_every_wire_field_with_its_type(client):
    wire = {f.name for f in optimize_pb2.StepRecord.DESCRIPTOR.fields}
    typed = {f.name for f in dataclasses.fields(StepRecord)} - {"raw"}
    assert typed == wire
    got = client.newton_step(problems.mse(np.ones(3)), np.zeros(3))
    row = got.record.to_dict()
    # MessageToDict drops iteration 0 and turns int64 into strings; to_dict keeps both
    assert row["iteration"] == 0 and isinstance(row["iteration"], int)
    # an undamped Cholesky proved the Hessian positive definite: no negative eigenvalue
    assert isinstance(row["negative_eigenvalues"], int) and row["negative_eigenvalues"] == 0
    assert row["gain_ratio"] is None  # NaN (not computed) is JSON null
    assert got.method is Method.NEWTON and got.method == "newton"
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.record.loss = 0.0  # type: ignore[misc]
    assert got.record.raw.loss == got.record.loss


def test_a_decoded_record_is_the_dataclass_its_constructor_builds():
    # from_wire skips the frozen __init__ for speed: on fresh random wire records every field,
    # equality, hashing, immutability, copies and replace() match a constructor-built one
    import copy

    from hessian_client.results import _STEP_CONVERTED, wire_values

    rng = np.random.default_rng()
    verdicts = list(optimize_pb2.Verdict.values())
    for _ in range(50):
        msg = optimize_pb2.StepRecord()
        for fd in msg.DESCRIPTOR.fields:
            if fd.name == "end_point":
                msg.end_point = int(rng.choice(verdicts))
            elif fd.type == fd.TYPE_DOUBLE:
                setattr(msg, fd.name, float(rng.standard_normal() * 10.0 ** rng.integers(-9, 9)))
            elif fd.type == fd.TYPE_BOOL:
                setattr(msg, fd.name, bool(rng.integers(2)))
            elif fd.type == fd.TYPE_STRING:
                setattr(msg, fd.name, str(rng.integers(1000)))
            else:
                setattr(msg, fd.name, int(rng.integers(-(2**31), 2**31)))
        built = StepRecord(**wire_values(msg, _STEP_CONVERTED), raw=msg)
        decoded = StepRecord.from_wire(msg)
        assert type(decoded) is StepRecord
        assert decoded == built and hash(decoded) == hash(built)
        assert dataclasses.asdict(decoded) == dataclasses.asdict(built)
        assert copy.copy(decoded) == built and copy.deepcopy(decoded) == built
        assert dataclasses.replace(decoded, loss=1.0) == dataclasses.replace(built, loss=1.0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            decoded.loss = 0.0  # type: ignore[misc]
        assert repr(decoded) == repr(built)

    @dataclasses.dataclass(frozen=True)
    class Tagged(StepRecord):
        def __post_init__(self) -> None:
            object.__setattr__(self, "tag", f"loss {self.loss}")

    msg.loss = float("nan")
    tagged = Tagged.from_wire(msg)  # a subclass's own __init__ and __post_init__ run
    assert type(tagged) is Tagged and tagged.tag == "loss nan" and math.isnan(tagged.loss)


def test_curvature_result_has_every_wire_field_converted():
    from hessian_client import CurvatureResult, DensityResult, TraceResult, Verdict, tensors
    from hessian_client.curvature import from_wire

    wire = [f.name for f in service_pb2.AnalyzeCurvatureResponse.DESCRIPTOR.fields]
    assert [f.name for f in dataclasses.fields(CurvatureResult)] == [*wire, "raw"]
    rng = np.random.default_rng(17)
    grid, dens = rng.standard_normal(5), rng.random(5)
    msg = service_pb2.AnalyzeCurvatureResponse(
        num_params=7, curvature=optimize_pb2.CURVATURE_GAUSS_NEWTON, loss=1.5,
        gradient_max_norm=0.25, stationary=True, top_eigenvalues=[3.0, 2.0],
        bottom_eigenvalues=[-1.0], eigen_residuals=[1e-9, 2e-9, 3e-9], lanczos_iterations=4,
        eigenvalues_converged=True,
        trace_hutchinson=optimize_pb2.TraceEstimate(estimate=4.0, half_width=0.5,
                                                    confidence=0.95, products=12),
        density=optimize_pb2.SpectralDensity(grid=tensors.encode(grid),
                                             density=tensors.encode(dens), sigma=0.1,
                                             probes=3, steps=8, trace=4.25),
        products=30, products_by_part={"lanczos": 20, "trace": 10},
        verdict=optimize_pb2.VERDICT_SADDLE, verdict_reason="why", seconds=0.5, backend="native",
    )  # fmt: skip
    got = from_wire(msg)
    assert got.curvature == "gauss_newton" and got.verdict is Verdict.SADDLE
    assert got.top_eigenvalues == [3.0, 2.0] and isinstance(got.top_eigenvalues, list)
    assert got.products_by_part == {"lanczos": 20, "trace": 10}
    assert got.trace_hutchinson == TraceResult(4.0, 0.5, 0.95, 12)
    assert got.trace_hutchpp is None  # unset on the wire
    assert isinstance(got.density, DensityResult) and got.density.trace == 4.25
    np.testing.assert_array_equal(got.density.grid, grid)
    np.testing.assert_array_equal(got.density.values, dens)
    row = got.to_dict()
    assert row["trace_hutchinson"] == {
        "estimate": 4.0, "half_width": 0.5, "confidence": 0.95, "products": 12
    }  # fmt: skip
    assert row["density"]["values"] == dens.tolist() and row["verdict"] == "saddle"
    assert "raw" not in row and got.raw is msg
    assert (row["num_params"], row["backend"], row["seconds"]) == (7, "native", 0.5)


def test_curvature_summary_has_every_wire_field(client):
    from hessian_client.results import CurvatureSummary

    wire = [f.name for f in optimize_pb2.CurvatureSummary.DESCRIPTOR.fields]
    assert [f.name for f in dataclasses.fields(CurvatureSummary)] == wire
    problem = problems.quadratic(np.diag([2.0, -1.0]), np.zeros(2))  # Hessian diag(2, -1)
    got = client.compute_hessian(problem, np.zeros(2), omit_matrix=True).summary
    assert (got.min_eigenvalue, got.max_eigenvalue, got.negative_eigenvalues) == (-1.0, 2.0, 1)
    assert got.to_dict()["trace"] == 1.0 and not got.positive_definite


def test_wire_dataclass_takes_every_kind_of_field():
    """A typed result derived from a descriptor takes any field a proto adds: enums, nested
    messages, repeated and map fields, not only the kinds today's results use."""
    from hessian_client.results import wire_dataclass, wire_values

    cls = wire_dataclass("Info", service_pb2.RunInfo, "doc")
    assert [f.name for f in dataclasses.fields(cls)] == [
        f.name for f in service_pb2.RunInfo.DESCRIPTOR.fields
    ]
    msg = service_pb2.RunInfo(run_id="r-1", status=service_pb2.RUN_STATUS_RUNNING)
    msg.options.learning_rate = 0.5
    got = cls(**wire_values(msg))
    assert (got.run_id, got.status, got.options.learning_rate) == ("r-1", 2, 0.5)
    assert got.to_dict()["options"]["learning_rate"] == 0.5


def test_run_info_is_typed_with_str_enums_datetimes_and_raw(client):
    run = client.start_run(
        problems.rosenbrock(dim=2), seed=0, method="newton", stopping={"max_iterations": 3}
    )
    info = run.wait(timeout=60)
    assert info.status is RunStatus.FINISHED and info.status == "FINISHED"
    assert info.stop_reason is StopReason.MAX_ITERATIONS and info.stop_reason == "max_iterations"
    assert info.method == "newton" and info.max_iterations == 3
    assert info.created_at <= info.started_at <= info.finished_at
    assert info.created_at.tzinfo is not None
    assert info.last_record.iteration == 3 and info.raw.run_id == run.id
    assert info.to_dict()["created_at"] == info.created_at.isoformat()


def test_run_options_and_stopping_are_typed_settings_not_protobuf(client):
    """RunInfo.options / .stopping were the protobuf messages: a repr of ~40 lines of wire
    enum names (METHOD_NEWTON_CG, CG_FORCING_EISENSTAT_WALKER)."""
    run = client.start_run(
        problems.rosenbrock(dim=2), seed=0, method="newton_cg", cg_forcing="eisenstat_walker",
        learning_rate=0.5, stopping={"max_iterations": 3},
    )  # fmt: skip
    info = run.wait(timeout=60)
    options, stopping = info.options, info.stopping
    assert isinstance(options, RunOptions) and isinstance(stopping, RunStopping)
    assert options.method == "newton_cg" and options.cg_forcing == "eisenstat_walker"
    assert options.learning_rate == 0.5 and options.damping == 0.0  # the default, applied
    assert stopping.max_iterations == 3 == info.max_iterations
    wire = info.raw.options
    for fd in wire.DESCRIPTOR.fields:  # one field per wire field, None exactly where unset
        unset = fd.has_presence and not wire.HasField(fd.name)
        assert (getattr(options, fd.name) is None) == unset, fd.name
    shown = repr(options)
    assert shown.startswith("RunOptions(method='newton_cg'") and "None" not in shown
    assert "METHOD_" not in repr(info) and info.to_dict()["options"]["method"] == "newton_cg"


def test_parameters_come_back_as_the_type_sent(client):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((40, 3)), (rng.random(40) > 0.5).astype(np.float64)
    problem = problems.logistic_regression(x, y, l2=0.1)
    start = torch.zeros(4, dtype=torch.float64)
    run = client.start_run(problem, start, stopping={"max_iterations": 5})
    result = run.result(timeout=60)
    assert isinstance(result.params, torch.Tensor) and result.params.dtype == torch.float64
    hess = client.compute_hessian(problem, start)
    assert isinstance(hess.matrix, torch.Tensor) and isinstance(hess.gradient, torch.Tensor)
    # the logistic Hessian at w = 0: X1^T X1 / (4 n) + l2 on the weights
    x1 = np.hstack([x, np.ones((40, 1))])
    want = x1.T @ x1 / (4 * 40) + np.diag([0.1, 0.1, 0.1, 0.0])
    np.testing.assert_allclose(hess.matrix.numpy(), want, rtol=1e-12, atol=1e-14)
    numpy_run = client.start_run(problem, np.zeros(4), stopping={"max_iterations": 5})
    assert isinstance(numpy_run.result(timeout=60).params, np.ndarray)
    np.testing.assert_array_equal(numpy_run.result().params, result.params.numpy())


def test_server_errors_carry_field_and_expected_as_status_details(client, stub):
    with pytest.raises(InvalidArgument) as err:
        client.newton_step(problems.mse(np.zeros(3)), np.zeros(3), learning_rate=-1.0)
    assert err.value.field == "options.learning_rate" and err.value.expected == "a number > 0"
    assert err.value.from_server and isinstance(err.value, HessianError)
    # on the wire: a google.rpc BadRequest field violation, not only the message text
    request = service_pb2.GetRunRequest(run_id="r-missing")
    with pytest.raises(grpc.RpcError) as raw:
        stub.GetRun(request)
    status = rpc_status.from_call(raw.value)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "run_id"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.start_run(problems.rosenbrock(), seed=1, init="normal_random"), "init"),
        (
            lambda c: c.newton_step(problems.rosenbrock(), np.zeros(2), method="lbfgs"),
            "options.method",
        ),
        (lambda c: c.newton_step("p-x", np.zeros(2), bogus=1), "options"),
        (lambda c: c.newton_step(42, np.zeros(2)), "problem"),
        (lambda c: c.newton_step("p-x", np.array(["a", "b"])), "params"),
        (lambda c: list(c.list_runs(["bogus"])), "status"),
        (lambda c: c.sample(0, [(2,)], dtype="float16"), "dtype"),
        # the server refused this one under "tensors[0].distribution" (a draw with no
        # objective has no default of its own)
        (lambda c: c.sample(0, [(2,)], distribution="objective_default"), "distribution"),
        (lambda c: list(c.list_runs(status=5)), "status"),
        # bool("no") is True: the parameters came back
        (lambda c: c.get_run("r-x", include_params="no"), "include_params"),
        # text that cannot be UTF-8 (a command-line argument that was not): protobuf raised
        # a bare UnicodeEncodeError
        (lambda c: c.get_run("r-\udcff"), "run_id"),
        (lambda c: c.newton_step("p-\udcff", [0.0, 0.0]), "problem_id"),
        (lambda c: c.start_run(problems.rosenbrock(dim=2), [0.0, 0.0], name="a\ud800"), "name"),
        # protobuf took True as 1.0 for a double (the engine refuses a bool there)
        (
            lambda c: c.newton_step(problems.rosenbrock(dim=2), [0.0, 0.0], learning_rate=True),
            "options.learning_rate",
        ),
        (
            lambda c: c.start_run(
                problems.rosenbrock(dim=2), [0.0, 0.0], stopping={"gradient_tolerance": False}
            ),
            "stopping.gradient_tolerance",
        ),
        # a TypeError from ** before
        (lambda c: c.start_run(problems.rosenbrock(dim=2), [0.0], stopping=[("a", 3)]), "stopping"),
    ],
)
def test_client_side_mistakes_raise_invalid_argument_naming_the_field(client, call, field):
    with pytest.raises(InvalidArgument) as err:
        call(client)
    assert err.value.field == field and not err.value.from_server
    assert err.value.expected and "expected" in err.value.message


@pytest.mark.parametrize("timeout", [0, -1, 1e-9])
def test_a_timeout_already_past_on_an_ended_run_returns_its_end(client, timeout):
    """A run that has ended has nothing to wait for: wait, result and stream return at once
    with its records (they raised DeadlineExceeded 'still FINISHED after 0 s')."""
    run = client.start_run(problems.rosenbrock(dim=2), np.zeros(2), stopping={"max_iterations": 3})
    records = list(run.stream())
    ended = client.run(run.id)  # a fresh handle, which has seen nothing
    assert ended.wait(timeout=timeout).status == "FINISHED"
    assert [r.iteration for r in client.run(run.id).stream(timeout=timeout)] == [
        r.iteration for r in records
    ]
    np.testing.assert_array_equal(
        client.run(run.id).result(timeout=timeout).params, run.result().params
    )


def test_wait_and_result_honour_their_timeout_on_a_queued_run(tmp_path):
    server = start_server(tmp_path, workers=1)
    try:
        with Client(server.address) as c:
            busy = start_endless_run(c)
            next(iter(busy.stream()))  # the only worker is now busy with it
            queued = c.start_run(problems.rosenbrock(dim=2), seed=0)
            assert queued.info().status == "QUEUED"
            outcome: dict = {}

            def wait() -> None:
                for name, fn in (("wait", queued.wait), ("result", queued.result)):
                    try:
                        fn(timeout=0.5)
                    except DeadlineExceeded as exc:
                        outcome[name] = exc

            waiter = threading.Thread(target=wait, daemon=True)
            waiter.start()
            waiter.join(timeout=60)  # a hang guard only; the timeout is 0.5 s
            assert not waiter.is_alive(), "wait(timeout=0.5) blocked on a QUEUED run"
            assert set(outcome) == {"wait", "result"}
            assert "QUEUED" in str(outcome["wait"]) and queued.id in str(outcome["wait"])
            busy.cancel()
            queued.cancel()
    finally:
        server.stop(grace=1.0)


class FlakyService(service_pb2_grpc.HessianServiceServicer):
    """Answers GetRun after two UNAVAILABLEs; StartRun is always UNAVAILABLE. Counts calls."""

    def __init__(self) -> None:
        self.calls = {"GetRun": 0, "StartRun": 0}

    def GetRun(self, request, context):
        self.calls["GetRun"] += 1
        if self.calls["GetRun"] <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return service_pb2.GetRunResponse(
            run_id=request.run_id, status=service_pb2.RUN_STATUS_QUEUED
        )

    def StartRun(self, request, context):
        self.calls["StartRun"] += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")


def test_idempotent_calls_are_retried_by_the_service_config_and_others_are_not():
    servicer = FlakyService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_HessianServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            info = c.get_run("r-1")
            assert info.status == "QUEUED" and info.last_record is None
            assert servicer.calls["GetRun"] == 3
            with pytest.raises(Unavailable):
                c.start_run("p-1", np.zeros(2))
            assert servicer.calls["StartRun"] == 1  # not idempotent: never retried
    finally:
        server.stop(grace=None)


def test_handshake_names_both_versions(client):
    info = client.info()
    assert info.api_version == API_VERSION and info.client_version == __version__
    older = service_pb2.ServerInfo(version="0.1.0", api_version="")
    with pytest.warns(VersionWarning, match=rf"API {API_VERSION}.*0\.1\.0 speaks API 1\.0"):
        check_versions(older)
    with pytest.warns(VersionWarning, match=r"speaks API 1\.10: upgrade hessian-client"):
        check_versions(service_pb2.ServerInfo(version="0.9.0", api_version="1.10"))
    with pytest.raises(IncompatibleServer, match=rf"API {API_VERSION}.*speaks API 2\.0"):
        check_versions(service_pb2.ServerInfo(version="9.0.0", api_version="2.0"))


def test_predict_returns_the_models_outputs_on_new_rows(client):
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((30, 3)), (rng.random(30) > 0.5).astype(np.float64)
    w, x_new = rng.standard_normal(4), rng.standard_normal((7, 3))
    problem = client.create_problem(problems.logistic_regression(x, y))
    got = client.predict(problem, w, x_new)
    np.testing.assert_allclose(got, x_new @ w[:3] + w[3], rtol=1e-12, atol=1e-12)
    own = client.predict(problem, w)
    np.testing.assert_allclose(own, x @ w[:3] + w[3], rtol=1e-12, atol=1e-12)
    with pytest.raises(InvalidArgument) as err:
        client.predict(problem, w, rng.standard_normal((7, 2)))
    assert err.value.field == "inputs" and "(rows, 3)" in err.value.expected
    with pytest.raises(InvalidArgument) as err:  # no model outputs: a clear error, not INTERNAL
        client.predict(problems.rosenbrock(), np.zeros(2))
    assert err.value.field == "problem" and "model outputs" in err.value.expected
    with pytest.raises(InvalidArgument) as err:
        client.predict(problems.mse(np.ones(3)), np.zeros(3), np.ones((2, 3)))
    assert err.value.field == "inputs"


def test_predict_mlp_matches_the_documented_layout(client):
    """Layer by layer W (out, in) row-major then b: a numpy forward pass must agree."""
    rng = np.random.default_rng(6)
    sizes = [4, 5, 3]
    x, labels = rng.standard_normal((20, 4)), rng.integers(0, 3, 20)
    n = sum(o * i + o for i, o in itertools.pairwise(sizes))
    params, x_new = rng.standard_normal(n), rng.standard_normal((6, 4))
    problem = problems.mlp(x, labels, layer_sizes=sizes, loss="cross_entropy")
    h, at = x_new, 0
    for k, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = params[at : at + fan_out * fan_in].reshape(fan_out, fan_in)
        b = params[at + fan_out * fan_in : at + fan_out * fan_in + fan_out]
        at += fan_out * fan_in + fan_out
        h = h @ w.T + b
        if k < len(sizes) - 2:
            h = np.tanh(h)
    np.testing.assert_allclose(client.predict(problem, params, x_new), h, rtol=1e-10, atol=1e-12)


def test_records_frame_has_one_row_per_iteration(client):
    pytest.importorskip("pandas")
    run = client.start_run(problems.rosenbrock(dim=2), seed=0, stopping={"max_iterations": 4})
    frame = run.records_frame()
    assert list(frame["iteration"]) == [0, 1, 2, 3, 4]
    assert frame["iteration"].dtype.kind == "i"
    np.testing.assert_array_equal(frame["loss"], [r.loss for r in run.stream()])


def test_sync_and_async_clients_agree_bit_for_bit(server, client):
    import asyncio

    from hessian_client import aio

    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal(50)
    problem = problems.least_squares(x, y, l2=0.01)
    w = rng.standard_normal(4)
    sync_step = client.newton_step(problem, w, method="newton_cg")
    sync_run = client.start_run(problem, w, stopping={"max_iterations": 6})
    sync_records = list(sync_run.stream())

    async def both():
        async with aio.Client(server.address) as ac:
            step = await ac.newton_step(problem, w, method="newton_cg")
            run = await ac.start_run(problem, w, stopping={"max_iterations": 6})
            records = [r async for r in run.stream()]
            result = await run.result(timeout=60)
            listed = [i.run_id async for i in ac.list_runs(page_size=1)]
            with pytest.raises(InvalidArgument) as err:
                await ac.newton_step(problem, w, learning_rate=-1.0)
            return step, records, result, listed, err.value

    step, records, result, listed, err = asyncio.run(both())
    np.testing.assert_array_equal(step.params, sync_step.params)
    assert step.record.cg_iterations == sync_step.record.cg_iterations
    assert [r.loss for r in records] == [r.loss for r in sync_records]
    np.testing.assert_array_equal(result.params, sync_run.result().params)
    assert result.info.status == "FINISHED" and result.info.run_id in listed[:2]
    assert err.field == "options.learning_rate"


def test_readme_example_error_is_the_engines_message():
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    from hessian_service.engine import make_objective

    x = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError) as err:
        make_objective(
            "softmax_regression", {"X": x, "labels": torch.tensor([0, 1, 7])}, {"num_classes": 4}
        )
    assert f"`{err.value}`" in readme


def test_numpy_numbers_generators_and_unset_values_are_taken_where_they_were(client):
    """The SDK's argument checks take what protobuf took: numpy scalars as timeouts and
    sizes, shapes as arrays or generators, None for an unset name or page size."""
    want = client.sample(3, [[2, 3]])[0]
    for shapes in (np.array([[2, 3]]), [np.array([2, 3])], (s for s in [(2, 3)])):
        np.testing.assert_array_equal(client.sample(np.uint64(3), shapes)[0], want)
    run = client.start_run(
        problems.rosenbrock(dim=2), np.zeros(2), name=None, stopping={"max_iterations": 3}
    )
    assert run.wait(np.int64(30)).status == "FINISHED" and run.wait(np.float32(30)).name == ""
    assert run.wait(float("inf")).status == "FINISHED"
    assert run.id in {r.run_id for r in client.list_runs(page_size=None)}
    with Client(client.address, timeout=np.int64(30)) as other:
        assert other.info().version
    with pytest.raises(InvalidArgument, match="ca_file: expected a path to a PEM file"):
        Client(client.address, ca_file=5)  # an int is a descriptor open() would close


def test_results_pickle_and_two_reads_of_a_run_compare_equal(client, rng):
    """No result could be pickled (the stubs' classes were registered under the module
    hessian.v1.*_pb2, which does not exist), two reads of one stored run were never equal
    (a record's NaN fields), comparing results holding final parameters raised numpy's
    ValueError, and hashing one raised TypeError."""
    import pickle

    x0 = rng.normal(size=3)
    run = client.start_run(problems.rosenbrock(dim=3), x0, stopping={"max_iterations": 5})
    final = run.result()
    first = client.get_run(run.id, include_params=True)
    second = client.get_run(run.id, include_params=True)
    assert math.isnan(first.last_record.trust_radius)  # a field a newton run leaves NaN
    assert first == second and hash(first) == hash(second)
    step = client.newton_step(problems.rosenbrock(dim=3), x0)
    values = [first, first.last_record, final, step, client.info()]
    for value in values:
        back = pickle.loads(pickle.dumps(value))
        assert back == value and type(back) is type(value)
        assert getattr(back, "raw", None) == getattr(value, "raw", None)
    moved = client.newton_step(problems.rosenbrock(dim=3), x0 + 1.0)
    assert moved != step and first.last_record != first.last_record.__class__.from_wire(
        optimize_pb2.StepRecord(iteration=99)
    )


def test_every_result_compares_by_value_and_hashes_alike_when_equal(rng):
    """The curvature results kept the generated dataclass equality (a DensityResult's
    arrays raised on ==, and on hash; a TraceResult with a NaN field was unequal to
    itself), and results equal through -0.0 == 0.0 hashed differently."""
    from hessian_client.curvature import DensityResult, TraceResult
    from hessian_client.results import RunResult

    grid, values = rng.normal(size=5), rng.random(5)
    a = DensityResult(grid, values, 0.1, 3, 4, math.nan)
    b = DensityResult(grid.copy(), values.copy(), 0.1, 3, 4, math.nan)
    assert a == b and hash(a) == hash(b)
    assert a != DensityResult(grid, values + 1.0, 0.1, 3, 4, math.nan)
    t = TraceResult(math.nan, 0.0, 0.95, 3)
    assert t == TraceResult(math.nan, 0.0, 0.95, 3) and hash(t) == hash(
        TraceResult(math.nan, 0.0, 0.95, 3)
    )
    zero, negative = RunResult(None, np.array([0.0, 1.0])), RunResult(None, np.array([-0.0, 1.0]))
    assert zero == negative and hash(zero) == hash(negative)
    same = TraceResult(-0.0, 0.0, 0.95, 3)
    assert same == TraceResult(0.0, 0.0, 0.95, 3) and hash(same) == hash(
        TraceResult(0.0, 0.0, 0.95, 3)
    )


def test_an_aio_call_in_flight_when_its_client_closes_raises_cancelled(server):
    """grpc.aio cancels the calls open on a channel it closes: the caller's task ended in a
    bare asyncio.CancelledError nobody asked for (gather and TaskGroup take that for the
    caller's own cancel). It gets Cancelled, a HessianError, as the sync client's caller
    does; a task its caller cancels keeps its CancelledError."""
    import asyncio

    from hessian_client import Cancelled, FailedPrecondition, aio

    async def main() -> None:
        client = aio.Client(server.address, timeout=30)
        run = await client.start_run(**start_endless_run_kwargs())
        stream = asyncio.create_task(_drain(run.stream()))
        waiting = asyncio.create_task(run.wait())
        cancelled_by_caller = asyncio.create_task(run.wait())
        await asyncio.sleep(0.3)
        cancelled_by_caller.cancel()
        await client.close()
        for task in (stream, waiting):
            with pytest.raises(Cancelled, match="closed while this call was in flight"):
                await task
        with pytest.raises(asyncio.CancelledError):
            await cancelled_by_caller
        with Client(server.address) as sync:
            sync.cancel_run(run.id)

    async def _drain(records) -> None:
        async for _ in records:
            pass

    asyncio.run(main())

    async def make() -> aio.Client:
        return aio.Client(server.address, timeout=30)

    client = asyncio.run(make())  # its loop is gone; another loop uses it
    with pytest.raises(FailedPrecondition, match="event loop it was created in"):
        asyncio.run(client.info())
    # made outside any loop: here (no loop left in this thread) grpc.aio raised a bare
    # RuntimeError; in a fresh process (a module-level client) it binds the thread's default
    # loop, and asyncio.run's first call failed untyped ("attached to a different loop")
    with pytest.raises(FailedPrecondition, match="inside the event loop that uses it"):
        aio.Client(server.address, timeout=30)
    module_level = (
        "import asyncio, sys\n"
        "from hessian_client import FailedPrecondition, aio\n"
        f"client = aio.Client({server.address!r}, timeout=30)\n"
        "try:\n"
        "    asyncio.run(client.info())\n"
        "except FailedPrecondition as exc:\n"
        "    sys.exit(f'refused: {exc.field}')\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", module_level],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.stderr.strip().endswith("refused: client"), done.stderr


def start_endless_run_kwargs() -> dict:
    """A gradient-descent run that goes on until cancelled."""
    return {"problem": problems.rosenbrock(dim=2), "params": np.array([-1.2, 1.0]),
            "method": "gradient_descent", "learning_rate": 1e-9,
            "stopping": {"max_iterations": 10**6, "gradient_tolerance": 0.0}}  # fmt: skip


def test_predict_takes_integer_and_bool_rows_of_a_real_valued_x(client):
    """Integer rows of a logistic regression's X were refused ("inputs.dtype: expected
    float32 or float64, like the problem's X, got torch.int64") and bool rows by the SDK,
    while CreateProblem took integer X: they are the reals they are. Reference: the float64
    linear outputs, computed here."""
    rng = np.random.default_rng()
    X = rng.integers(-3, 4, size=(20, 3))
    y = rng.integers(0, 2, size=20)
    w = rng.standard_normal(4)
    problem = client.create_problem(problems.logistic_regression(X, y))
    rows = rng.integers(-3, 4, size=(5, 3))
    for given in (rows, rows.tolist(), rows.astype(np.int32)):
        np.testing.assert_allclose(client.predict(problem, w, given), rows @ w[:3] + w[3],
                                   rtol=1e-14, atol=1e-14)  # fmt: skip
    flags = rows > 0
    np.testing.assert_allclose(client.predict(problem, w, flags), flags @ w[:3] + w[3],
                               rtol=1e-14, atol=1e-14)  # fmt: skip
