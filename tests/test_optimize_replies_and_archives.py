"""Without a server: the exported-program verifier refuses archive sizes and dtypes no
torch constructor may see (INVALID_ARGUMENT naming the program, never an internal error),
Predict on an exported program names `inputs` when the row count cannot be taken, and an
Optimize reply must have exactly the shape asked (no reshaping of flat or transposed
tensors)."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from collections.abc import Callable

import numpy as np
import pytest
import torch
from exported_programs import edited_archive, from_problem
from hessian_client import problems, tensors
from hessian_client.proto import service_pb2
from hessian_service.engine.errors import ResourceLimitError, ValidationError
from hessian_service.engine.objectives.export_verify import (
    MAX_MEMBER_BYTES,
    MAX_NODES,
    load_program,
)
from hessian_service.engine.solvers.asktell import Ask
from hessian_service.server.optimize import _answer_from_wire

F64 = torch.float64
PROGRAM = "problem.exported.program"


def mse_problem(rows: int, cols: int) -> problems.Problem:
    """A least-squares loss of fresh random data, exported with static shapes."""
    X, y = torch.randn(rows, cols, dtype=F64), torch.randn(rows, dtype=F64)
    return problems.exported(
        lambda p, X, y: torch.mean((X @ p - y) ** 2), torch.zeros(cols, dtype=F64), {"X": X, "y": y}
    )


def batchnorm_problem() -> problems.Problem:
    """A net whose BatchNorm running stats travel as raw-byte weights (tensor constants)."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.BatchNorm1d(6)).double().eval()
    X, y = torch.randn(9, 3, dtype=F64), torch.randn(9, 6, dtype=F64)
    return problems.exported(net, None, {"X": X, "y": y}, loss="mse")


def values(doc: dict) -> dict:
    return doc["graph_module"]["graph"]["tensor_values"]


def set_sizes(name: str, sizes: list) -> Callable[[dict], None]:
    return lambda doc: values(doc)[name].__setitem__("sizes", [{"as_int": s} for s in sizes])


def first_weight_sizes(sizes: list[int]) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        entry = next(iter(config["config"].values()))
        entry["tensor_meta"]["sizes"] = [{"as_int": s} for s in sizes]

    return edit


def understated(
    blob: bytes, suffix: str, real: int, declared: int, method: int = zipfile.ZIP_DEFLATED
) -> bytes:
    """The archive `blob` with its member ending in `suffix` replaced by `real` bytes of
    spaces whose zip headers declare `declared` bytes (how a zip bomb hides its size),
    every member compressed with `method`."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        files = {name: z.read(name) for name in z.namelist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as z:
        for member, raw in files.items():
            z.writestr(member, b" " * real if member.endswith(suffix) else raw)
    data = bytearray(out.getvalue())
    name = next(n for n in files if n.endswith(suffix)).encode()
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at >= 0:
            head = 30 if signature == b"PK\x03\x04" else 46
            if data[at + head : at + head + len(name)] == name:
                struct.pack_into("<I", data, at + offset, declared)
            at = data.find(signature, at + 4)
    return bytes(data)


@pytest.mark.parametrize(
    "method",
    [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
    ids=["deflate", "bzip2", "lzma"],
)
def test_a_member_that_understates_its_size_is_not_inflated_past_the_limit(method) -> None:
    """A member whose headers declare 100 bytes and which inflates to 4x the per-member
    limit: zipfile's whole-member read inflated all of it (up to 2 GiB a call) before
    cutting to the declared size; the read is now bounded, and the archive refused. bzip2
    and lzma members, which zipfile inflates whole whatever the read asks, are refused
    unread (torch.export.save stores its members)."""
    real = 4 * MAX_MEMBER_BYTES
    program = mse_problem(20, 3).exported.program
    blob = understated(program, "models/model.json", real, 100, method)
    assert len(blob) < real // 100  # a small request
    tracemalloc.start()
    try:
        with pytest.raises(ValidationError, match="program"):
            load_program(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_MEMBER_BYTES // 8, peak


def test_a_negative_declared_size_is_refused_naming_the_program() -> None:
    cols = int(torch.randint(2, 6, ()))
    blob = edited_archive(
        mse_problem(40, cols).exported.program, "models/model.json", set_sizes("params", [-cols])
    )
    with pytest.raises(ValidationError) as err:
        load_program(blob)
    assert err.value.field == PROGRAM
    assert str(err.value) == f"{PROGRAM}: expected sizes >= 0 for value 'params', got {-cols}"


def test_negative_sizes_whose_product_is_positive_are_refused() -> None:
    """[-rows, -cols] on a data input: its element count looks fine, torch would still raise."""
    rows, cols = int(torch.randint(20, 60, ())), int(torch.randint(2, 6, ()))
    blob = edited_archive(
        mse_problem(rows, cols).exported.program,
        "models/model.json",
        set_sizes("x", [-rows, -cols]),
    )
    with pytest.raises(ValidationError, match=rf"sizes >= 0 for value 'x', got {-rows}$"):
        load_program(blob)


def test_negative_sizes_of_a_tensor_constant_are_refused() -> None:
    """A BatchNorm buffer's declared [-2, -3] (6 elements, its byte count) is refused, not
    reshaped into a RuntimeError."""
    blob = edited_archive(
        batchnorm_problem().exported.program,
        "model_weights_config.json",
        first_weight_sizes([-2, -3]),
    )
    with pytest.raises(ValidationError, match=r"sizes >= 0 for constant '.*', got -2$"):
        load_program(blob)


def test_a_size_past_the_element_limit_is_a_resource_limit_even_beside_a_zero() -> None:
    blob = edited_archive(
        mse_problem(30, 3).exported.program, "models/model.json", set_sizes("x", [0, 2**70])
    )
    with pytest.raises(ResourceLimitError, match=rf"value 'x' declares a size of {2**70}, over"):
        load_program(blob)


@pytest.mark.parametrize("code", [True, [8], "8", 9])
def test_a_dtype_that_is_not_a_known_code_is_refused(code: object) -> None:
    """true would be code 1 (uint8) by equality; a list is unhashable: both named."""

    def edit(doc: dict) -> None:
        values(doc)["params"]["dtype"] = code

    blob = edited_archive(mse_problem(30, 3).exported.program, "models/model.json", edit)
    with pytest.raises(ValidationError, match=r"expected a known dtype code .* for value 'params'"):
        load_program(blob)


@pytest.mark.parametrize("nodes", ["abc", {"a": 1}, 7])
def test_graph_nodes_that_are_not_a_list_are_invalid_not_a_resource_limit(nodes: object) -> None:
    def edit(doc: dict) -> None:
        doc["graph_module"]["graph"]["nodes"] = nodes

    blob = edited_archive(mse_problem(30, 3).exported.program, "models/model.json", edit)
    with pytest.raises(ValidationError) as err:
        load_program(blob)
    assert str(err.value) == (
        f"{PROGRAM}: expected a list of nodes at graph_module.graph.nodes, "
        f"got {type(nodes).__name__}"
    )


def test_too_many_nodes_is_still_a_resource_limit() -> None:
    def edit(doc: dict) -> None:
        graph = doc["graph_module"]["graph"]
        graph["nodes"] = graph["nodes"] * (MAX_NODES // len(graph["nodes"]) + 1)

    blob = edited_archive(mse_problem(30, 3).exported.program, "models/model.json", edit)
    with pytest.raises(ResourceLimitError, match=rf"at most {MAX_NODES} nodes \(it has \d+\)"):
        load_program(blob)


def linear_outputs(params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return X @ params


def linear_problem(rows: int, cols: int, row_inputs: tuple[str, ...]) -> tuple:
    X, y = torch.randn(rows, cols, dtype=F64), torch.randn(rows, dtype=F64)
    problem = problems.exported(
        linear_outputs, torch.zeros(cols, dtype=F64), {"X": X, "y": y}, loss="mse", rows=row_inputs
    )
    return from_problem(problem), X


def test_predict_of_a_static_program_on_other_rows_names_inputs_and_the_rows_required() -> None:
    rows, cols = int(torch.randint(30, 80, ())), int(torch.randint(2, 6, ()))
    objective, X = linear_problem(rows, cols, ())
    params = torch.randn(cols, dtype=F64)
    for new in (7, 0, rows + 1):
        with pytest.raises(ValidationError) as err:
            objective.predict(params, torch.randn(new, cols, dtype=F64))
        assert err.value.field == "inputs"
        assert str(err.value).startswith(f"inputs: expected {rows} rows: the program was exported")
        assert str(err.value).endswith(f"got {new} rows")
    torch.testing.assert_close(objective.predict(params, X), X @ params, rtol=1e-15, atol=0)


def test_predict_with_rows_names_inputs_for_zero_rows_and_matches_float64_elsewhere() -> None:
    rows, cols = int(torch.randint(30, 80, ())), int(torch.randint(2, 6, ()))
    objective, _ = linear_problem(rows, cols, ("X",))
    params = torch.randn(cols, dtype=F64)
    with pytest.raises(ValidationError) as err:
        objective.predict(params, torch.zeros(0, cols, dtype=F64))
    assert err.value.field == "inputs"
    assert "rows (the program's exported row range), got 0 rows" in str(err.value)
    new = torch.randn(int(torch.randint(1, 20, ())), cols, dtype=F64)
    torch.testing.assert_close(objective.predict(params, new), new @ params, rtol=1e-15, atol=0)


def test_predict_keeps_its_refusal_of_rows_of_the_wrong_shape() -> None:
    objective, _ = linear_problem(40, 3, ())
    with pytest.raises(ValidationError, match=r"inputs: expected a 2-D array shaped \(rows, 3\)"):
        objective.predict(torch.zeros(3, dtype=F64), torch.zeros(7, 4, dtype=F64))


def evaluation(ask: Ask, loss: float, **quantities: np.ndarray) -> service_pb2.Evaluation:
    """The reply to `ask`: `loss` and each named quantity, encoded as sent."""
    out = service_pb2.Evaluation(request_id=ask.request_id, loss=loss)
    for name, value in quantities.items():
        getattr(out, name).CopyFrom(tensors.encode(value))
    return out


@pytest.mark.parametrize(
    ("asked", "name", "reply"),
    [
        ({"gradient": True}, "gradient", lambda n, k: (1, n)),
        ({"gradient": True}, "gradient", lambda n, k: (n, 1)),
        ({"hessian": True}, "hessian", lambda n, k: (n * n,)),
        ({"hvp_vectors": True}, "hvps", lambda n, k: (n, k)),
        ({"gn_vectors": True}, "gn_products", lambda n, k: (n, k)),
        ({"hvp_vectors": True}, "hvps", lambda n, k: (k * n,)),
    ],
)
def test_a_reply_of_the_right_size_but_another_shape_is_refused(asked, name, reply, rng) -> None:
    n = int(rng.integers(3, 9))
    k = int(rng.integers(1, n))  # k != n: a transposed (n, k) block has the same size
    values = dict(asked)
    for key in ("hvp_vectors", "gn_vectors"):
        if key in values:
            values[key] = torch.from_numpy(rng.normal(size=(k, n)))
    ask = Ask(1, torch.from_numpy(rng.normal(size=n)), **values)
    expected = {"gradient": (n,), "hessian": (n, n), "hvps": (k, n), "gn_products": (k, n)}[name]
    shape = reply(n, k)
    with pytest.raises(ValidationError) as err:
        _answer_from_wire(evaluation(ask, rng.random(), **{name: rng.normal(size=shape)}), ask)
    assert str(err.value) == (
        f"evaluation.{name}: expected a tensor of shape {list(expected)} (as asked), "
        f"got shape {list(shape)}"
    )


def test_replies_of_the_asked_shapes_arrive_exactly_in_the_runs_dtype(rng) -> None:
    n = int(rng.integers(3, 9))
    k = int(rng.integers(1, n))
    ask = Ask(
        3,
        torch.from_numpy(rng.normal(size=n)),
        gradient=True,
        hessian=True,
        hvp_vectors=torch.from_numpy(rng.normal(size=(k, n))),
    )
    g, h = rng.normal(size=n), rng.normal(size=(n, n))
    hv = rng.normal(size=(k, n)).astype(np.float32)  # float32 reply to a float64 run
    loss = rng.random()
    answer = _answer_from_wire(evaluation(ask, loss, gradient=g, hessian=h, hvps=hv), ask)
    assert answer.loss == loss
    assert answer.gradient.dtype == answer.hessian.dtype == answer.hvps.dtype == F64
    np.testing.assert_array_equal(answer.gradient.numpy(), g)
    np.testing.assert_array_equal(answer.hessian.numpy(), h)
    np.testing.assert_array_equal(answer.hvps.numpy(), hv.astype(np.float64))


def test_an_integer_reply_is_refused_naming_its_dtype(rng) -> None:
    n = int(rng.integers(3, 9))
    ask = Ask(1, torch.from_numpy(rng.normal(size=n)), gradient=True)
    reply = evaluation(ask, rng.random(), gradient=rng.integers(-5, 5, size=n))
    with pytest.raises(ValidationError, match=r"^evaluation\.gradient\.dtype: expected FLOAT32"):
        _answer_from_wire(reply, ask)


@pytest.mark.parametrize("name", ["gradient", "hessian", "hvps"])
def test_a_float64_reply_that_overflows_a_float32_run_is_refused_naming_it(name, rng) -> None:
    """A finite float64 reply past float32's range: the cast made it inf, and the run ended
    NON_FINITE "at the initial parameters" with no field named (a NaN reply is refused)."""
    n, k = int(rng.integers(2, 6)), 2
    asked = {"gradient": {"gradient": True}, "hessian": {"hessian": True}}.get(
        name, {"hvp_vectors": torch.from_numpy(rng.normal(size=(k, n))).float()}
    )
    ask = Ask(1, torch.from_numpy(rng.normal(size=n)).float(), **asked)
    shape = {"gradient": (n,), "hessian": (n, n), "hvps": (k, n)}[name]
    reply = rng.normal(size=shape)
    reply.flat[int(rng.integers(reply.size))] = 1e300
    with pytest.raises(ValidationError) as err:
        _answer_from_wire(evaluation(ask, rng.random(), **{name: reply}), ask)
    assert err.value.field == f"evaluation.{name}"
    assert "overflow float32" in str(err.value)
    fits = rng.normal(size=shape)  # the same reply within range is taken, cast
    answer = _answer_from_wire(evaluation(ask, rng.random(), **{name: fits}), ask)
    got = getattr(answer, name)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), fits.astype(np.float32))
