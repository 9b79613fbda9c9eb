"""Through a real server: an Optimize reply of the right size but another shape fails
the run naming the field and both shapes; stop=false is ignored; int64 initial params are
refused before any run exists; a malformed exported archive and Predict on rows an exported
program cannot take are INVALID_ARGUMENT naming the field. A cancelled Optimize run ends on
the point of its last record."""

from __future__ import annotations

import io
import json
import zipfile

import grpc
import numpy as np
import pytest
import torch
from hessian_client import Client, InvalidArgument, minimize, problems, tensors
from hessian_client.proto import optimize_pb2, service_pb2
from optimize_stream import HANG_GUARD, Stream
from scipy.optimize import rosen, rosen_der, rosen_hess, rosen_hess_prod

RECORD_FIELDS = ("iteration", "loss", "gradient_norm", "step_norm", "step_size", "damping")


def start_request(x0: np.ndarray, method: int = 0, **caps: bool) -> service_pb2.OptimizeRequest:
    return service_pb2.OptimizeRequest(
        start=service_pb2.OptimizeStart(
            initial_params=tensors.encode(x0),
            capabilities=service_pb2.Capabilities(**caps),
            options=optimize_pb2.MethodOptions(method=method),
        )
    )


def rosen_values(ask: service_pb2.EvaluationRequest) -> service_pb2.Evaluation:
    """Rosenbrock's loss and whatever else `ask` asks, in the shapes asked."""
    x = tensors.decode(ask.point)
    out = service_pb2.Evaluation(request_id=ask.request_id, loss=rosen(x))
    if ask.gradient:
        out.gradient.CopyFrom(tensors.encode(rosen_der(x)))
    if ask.hessian:
        out.hessian.CopyFrom(tensors.encode(rosen_hess(x)))
    if ask.HasField("hvp_vectors"):
        vectors = tensors.decode(ask.hvp_vectors)
        out.hvps.CopyFrom(tensors.encode(np.stack([rosen_hess_prod(x, v) for v in vectors])))
    return out


def start(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(-1.5, 1.5, n)


def drive(stream: Stream, before_each=None) -> tuple[list, service_pb2.RunInfo]:
    """Answer every ask with rosen_values (calling `before_each(stream)` first) to the end."""
    records = []
    while True:
        response = stream.read()
        records.extend(response.records)
        if response.WhichOneof("kind") == "finished":
            return records, response.finished
        if response.WhichOneof("kind") == "evaluate":
            if before_each is not None:
                before_each(stream)
            stream.send(evaluation=rosen_values(response.evaluate))


@pytest.mark.parametrize(
    ("method", "caps", "name", "shape"),
    [
        ("newton", {"hessian": True}, "gradient", lambda n: (1, n)),
        ("newton", {"hessian": True}, "hessian", lambda n: (n * n,)),
        ("newton_cg", {"hvp": True}, "hvps", lambda n: (n, 1)),  # asked (1, n): transposed
    ],
)
def test_a_reply_of_another_shape_fails_the_run_naming_field_and_shapes(
    server, rng, method, caps, name, shape
):
    n = int(rng.integers(3, 8))
    wire_method = optimize_pb2.Method.Value(f"METHOD_{method.upper()}")
    stream = Stream(
        server.address, start_request(start(rng, n), wire_method, gradient=True, **caps)
    )
    try:
        run_id = stream.read().started.run_id
        ask = stream.read().evaluate
        while not (
            ask.gradient if name == "gradient" else ask.hessian or ask.HasField("hvp_vectors")
        ):
            stream.send(evaluation=rosen_values(ask))
            ask = stream.read().evaluate
        reply = rosen_values(ask)
        asked = list(tensors.decode(getattr(reply, name)).shape)
        spoiled = tensors.decode(getattr(reply, name)).reshape(shape(n))
        getattr(reply, name).CopyFrom(tensors.encode(spoiled))
        stream.send(evaluation=reply)
        last = stream.read()  # before the fix: the next evaluation request, the run going on
    finally:
        stream.close()
    assert last.WhichOneof("kind") == "finished"
    assert last.finished.status == service_pb2.RUN_STATUS_FAILED
    assert last.finished.message == (
        f"evaluation.{name}: expected a tensor of shape {asked} (as asked), "
        f"got shape {list(shape(n))}"
    )
    with Client(server.address) as client:
        assert client.get_run(run_id).status == "FAILED"


def test_stop_false_is_ignored_and_the_run_equals_one_without_it(server, rng):
    x0 = start(rng, int(rng.integers(3, 8)))
    runs = []
    for before_each in (None, lambda s: s.send(stop=False)):
        stream = Stream(server.address, start_request(x0, gradient=True, hessian=True))
        try:
            stream.read()  # started
            runs.append(drive(stream, before_each))
        finally:
            stream.close()
    (plain, plain_info), (ours, info) = runs
    assert info.status == service_pb2.RUN_STATUS_FINISHED, info.message
    assert [tuple(getattr(r, f) for f in RECORD_FIELDS) for r in ours] == [
        tuple(getattr(r, f) for f in RECORD_FIELDS) for r in plain
    ]
    final = tensors.decode(info.final_params)
    np.testing.assert_array_equal(final, tensors.decode(plain_info.final_params))
    assert rosen(final) == info.last_record.loss


def test_int64_initial_params_are_refused_before_any_run_exists(server, rng):
    n = int(rng.integers(2, 8))
    with Client(server.address) as client:
        before = [r.run_id for r in client.list_runs()]
    refused = Stream(server.address, start_request(rng.integers(-3, 3, n), gradient=True)).refusal()
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details() == (
        "start.initial_params.dtype: expected FLOAT32 or FLOAT64, got INT64"
    )
    with Client(server.address) as client:
        assert [r.run_id for r in client.list_runs()] == before


def test_no_initial_params_at_all_are_refused_before_any_run_exists(server):
    # an empty start ran to FINISHED 'converged: gradient max-norm 0' (minimize refuses it)
    with Client(server.address) as client:
        before = [r.run_id for r in client.list_runs()]
    refused = Stream(server.address, start_request(np.zeros(0), gradient=True)).refusal()
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details() == (
        "start.initial_params: expected at least one parameter, got 0 values"
    )
    with Client(server.address) as client:
        assert [r.run_id for r in client.list_runs()] == before


def exported_mse(rows: int, cols: int, rows_dynamic: tuple[str, ...] = ()):
    X, y = torch.randn(rows, cols, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    problem = problems.exported(
        lambda p, X: X @ p,
        torch.zeros(cols, dtype=torch.float64),
        {"X": X, "y": y},
        loss="mse",
        rows=rows_dynamic,
    )
    return problem, X


def test_a_negative_declared_size_is_invalid_argument_not_internal(server, rng):
    cols = int(rng.integers(2, 6))
    problem, _ = exported_mse(int(rng.integers(20, 60)), cols)
    src, out = zipfile.ZipFile(io.BytesIO(problem.exported.program)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name in src.namelist():
            raw = src.read(name)
            if name.endswith("models/model.json"):
                doc = json.loads(raw)
                doc["graph_module"]["graph"]["tensor_values"]["params"]["sizes"] = [
                    {"as_int": -cols}
                ]
                raw = json.dumps(doc).encode()
            z.writestr(name, raw)
    problem.exported.program = out.getvalue()
    with Client(server.address) as client, pytest.raises(InvalidArgument) as err:
        client.newton_step(problem, np.zeros(cols))
    assert err.value.field == "problem.exported.program" and err.value.from_server
    assert err.value.message.endswith(f"expected sizes >= 0 for value 'params', got {-cols}")


def test_predict_names_inputs_and_the_rows_an_exported_program_takes(server, rng):
    rows, cols = int(rng.integers(30, 80)), int(rng.integers(2, 6))
    static, X = exported_mse(rows, cols)
    dynamic, _ = exported_mse(rows, cols, ("X",))
    params = rng.normal(size=cols)
    with Client(server.address) as client:
        with pytest.raises(InvalidArgument) as err:
            client.predict(static, params, X[:7].numpy())
        assert err.value.field == "inputs"
        assert err.value.message.startswith(f"inputs: expected {rows} rows: the program")
        with pytest.raises(InvalidArgument) as err:
            client.predict(dynamic, params, np.zeros((0, cols)))
        assert err.value.field == "inputs" and err.value.message.endswith("got 0 rows")
        new = rng.normal(size=(int(rng.integers(1, 20)), cols))
        np.testing.assert_allclose(client.predict(dynamic, params, new), new @ params, rtol=1e-14)


def test_a_callback_stop_ends_on_the_point_of_the_last_record(server, rng):
    def callback(intermediate):
        if intermediate.nit >= 3:
            raise StopIteration

    x0 = start(rng, int(rng.integers(4, 8)))
    res = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, callback=callback,
                   options={"gtol": 0.0}, address=server.address)  # fmt: skip
    assert res.run_status == "CANCELLED"
    assert res.fun == rosen(res.x)
    with Client(server.address) as client:
        result = client.run(res.run_id).result(timeout=HANG_GUARD)
    assert result.info.last_record.loss == rosen(result.params)


def test_cancel_run_on_a_waiting_caller_ends_on_the_point_of_the_last_record(server, rng):
    stream = Stream(server.address, start_request(start(rng, 6), gradient=True, hessian=True))
    try:
        run_id = stream.read().started.run_id
        seen = 0
        while seen < 3:  # answer until three records arrived, then keep the next ask waiting
            response = stream.read()
            seen += len(response.records)
            if seen < 3:
                stream.send(evaluation=rosen_values(response.evaluate))
        with Client(server.address) as other:
            other.cancel_run(run_id)
        _, info = drive(stream)
    finally:
        stream.close()
    assert info.status == service_pb2.RUN_STATUS_CANCELLED
    assert rosen(tensors.decode(info.final_params)) == info.last_record.loss
