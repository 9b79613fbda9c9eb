"""Exported programs through a live server: hostile and malformed archives are refused with
the right code and a message naming what is wrong (pickle payloads never run), the server
keeps serving, and a valid program steps and runs like its catalogue twin."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import pickle
import zipfile
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
from hessian_client import problems
from hessian_client.errors import HessianError
from hessian_client.proto import problem_pb2

F64 = torch.float64
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
N, D = 5, 3
PREFIX = "archive/"


class Payload:
    """Unpickling this creates the file `path`: proof, if it exists, that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def least_squares(params, X, y):
    w = params.reshape(D, 1)
    r = X @ w - y.reshape(-1, 1)
    return 0.5 * torch.mean(r * r) + torch.tensor(0.05, dtype=F64) * torch.sum(params * params)


def data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=gen, dtype=F64)
    return {"X": x, "y": torch.randn(N, generator=gen, dtype=F64)}


def valid(fn: Callable = least_squares, **kw) -> problem_pb2.Problem:
    return problems.exported(fn, torch.zeros(D, dtype=F64), data(), **kw)


def members(blob: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return {name: z.read(name) for name in z.namelist()}


def rezip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, raw in files.items():
            z.writestr(name, raw)
    return out.getvalue()


def with_program(problem: problem_pb2.Problem, blob: bytes) -> problem_pb2.Problem:
    copy = problem_pb2.Problem()
    copy.CopyFrom(problem)
    copy.exported.program = blob
    return copy


def edit_members(changes: dict[str, bytes | None]) -> Callable:
    """A case replacing (bytes), adding or deleting (None) archive members; '@' is the payload path."""  # noqa: E501

    def make(problem: problem_pb2.Problem, path: str) -> problem_pb2.Problem:
        files = members(problem.exported.program)
        for name, raw in changes.items():
            if raw is None:
                files.pop(PREFIX + name, None)
            else:
                files[PREFIX + name] = raw.replace(b"@", path.encode())
        return with_program(problem, rezip(files))

    return make


def edit_graph(
    fn: Callable[[dict], None],
) -> Callable[[problem_pb2.Problem, str], problem_pb2.Problem]:
    """A case editing the graph JSON (models/model.json) in place."""

    def make(problem: problem_pb2.Problem, path: str) -> problem_pb2.Problem:
        files = members(problem.exported.program)
        doc = json.loads(files[PREFIX + "models/model.json"])
        fn(doc["graph_module"])
        files[PREFIX + "models/model.json"] = json.dumps(doc).encode()
        return with_program(problem, rezip(files))

    return make


def node(gm: dict, target: str) -> dict:
    return next(n for n in gm["graph"]["nodes"] if n["target"] == target)


def set_target(old: str, new: str) -> Callable[[dict], None]:
    return lambda gm: node(gm, old).__setitem__("target", new)


def payload_pickle(path: str, protocol: int = 2) -> bytes:
    return pickle.dumps(Payload(path), protocol=protocol)


def payload_torch_save(path: str) -> bytes:
    buf = io.BytesIO()
    torch.save({"X": Payload(path)}, buf)
    return buf.getvalue()


def pickled_constant(problem: problem_pb2.Problem, path: str) -> problem_pb2.Problem:
    files = members(problem.exported.program)
    key = PREFIX + "data/constants/model_constants_config.json"
    config = json.loads(files[key])
    (entry,) = config["config"].values()
    entry["use_pickle"] = True
    files[key] = json.dumps(config).encode()
    files[PREFIX + "data/constants/" + entry["path_name"]] = payload_pickle(path)
    return with_program(problem, rezip(files))


def weights_payload(problem: problem_pb2.Problem, path: str) -> problem_pb2.Problem:
    files = members(problem.exported.program)
    config = {"config": {"w": {"path_name": "weight_0", "is_param": True, "use_pickle": True}}}
    files[PREFIX + "data/weights/model_weights_config.json"] = json.dumps(config).encode()
    files[PREFIX + "data/weights/weight_0"] = payload_pickle(path)
    return with_program(problem, rezip(files))


def sample_inputs(make_payload: Callable[[str], bytes]) -> Callable:
    def make(problem: problem_pb2.Problem, path: str) -> problem_pb2.Problem:
        files = members(problem.exported.program)
        files[PREFIX + "data/sample_inputs/model.pt"] = make_payload(path)
        return with_program(problem, rezip(files))

    return make


def field(name: str, value: object) -> Callable:
    def make(problem: problem_pb2.Problem, path: str) -> problem_pb2.Problem:
        copy = problem_pb2.Problem()
        copy.CopyFrom(problem)
        if name == "param_shape":
            del copy.exported.param_shape[:]
            copy.exported.param_shape.extend(value)
        else:
            setattr(copy.exported, name, value)
        return copy

    return make


def data_edit(**tensors: np.ndarray | None) -> Callable:
    def make(problem: problem_pb2.Problem, path: str) -> problem_pb2.Problem:
        from hessian_client.tensors import encode

        copy = problem_pb2.Problem()
        copy.CopyFrom(problem)
        for name, value in tensors.items():
            if value is None:
                del copy.data[name]
            else:
                copy.data[name].CopyFrom(encode(value))
        return copy

    return make


def exported_fn(fn: Callable, **kw) -> Callable:
    return lambda problem, path: valid(fn, **kw)


def symbolic(gm: dict) -> None:
    gm["graph"]["tensor_values"]["x"]["sizes"][0] = {"as_expr": {"expr_str": "s0"}}


def huge_value(gm: dict) -> None:
    gm["graph"]["tensor_values"]["matmul"]["sizes"] = [{"as_int": 10**6}, {"as_int": 10**6}]


def lying_reshape(gm: dict) -> None:  # the graph computes (1, 3) but declared (3, 1)
    node(gm, "torch.ops.aten.reshape.default")["inputs"][1]["arg"]["as_ints"] = [1, 3]


def mismatched_matmul(gm: dict) -> None:  # consistently (1, 3): X (5, 3) @ (1, 3) raises
    lying_reshape(gm)
    gm["graph"]["tensor_values"]["reshape"]["sizes"] = [{"as_int": 1}, {"as_int": 3}]


def undefined_input(gm: dict) -> None:
    node(gm, "torch.ops.aten.matmul.default")["inputs"][0]["arg"]["as_tensor"]["name"] = "ghost"


def outer(params, X, y):
    return (X.reshape(-1, 1) * y.reshape(1, -1)).sum() + params.sum()


def small_outer(gm: dict) -> None:  # (15, 5) declared (1, 1): would allocate before a check
    gm["graph"]["tensor_values"]["mul"]["sizes"] = [{"as_int": 1}, {"as_int": 1}]


def out_of_range_rows(problem: problem_pb2.Problem, path: str) -> problem_pb2.Problem:
    """Rows picked by int data: valid when exported, index 99 of 5 rows sent: raises."""
    from hessian_client.tensors import encode

    def rows(params, X, idx):
        return (X.index_select(0, idx) @ params).sum()

    tensors = {"X": data()["X"], "idx": torch.tensor([0, 2])}
    made = problems.exported(rows, torch.zeros(D, dtype=F64), tensors)
    made.data["idx"].CopyFrom(encode(np.array([0, 99])))
    return made


STOP = {"max_iterations": 3}
MATMUL = "torch.ops.aten.matmul.default"
# (case name, builder, expected code, words the message must contain)
CASES = [
    (
        "pickle in sample inputs",
        sample_inputs(payload_pickle),
        INVALID,
        ["sample_inputs", "GLOBAL"],
    ),
    ("pickle protocol 4", sample_inputs(lambda p: payload_pickle(p, 4)), INVALID, ["STACK_GLOBAL"]),
    ("torch.save of a payload", sample_inputs(payload_torch_save), INVALID, ["data.pkl", "GLOBAL"]),
    ("pickled constant", pickled_constant, INVALID, ["pickle"]),
    ("pickled weights", weights_payload, INVALID, ["weight"]),
    ("unknown member", edit_members({"evil.pkl": b"@"}), INVALID, ["member", "evil"]),
    ("not a zip", lambda p, _: with_program(p, b"garbage" * 50), INVALID, ["zip"]),
    ("truncated", lambda p, _: with_program(p, p.exported.program[:700]), INVALID, ["zip"]),
    ("empty program", lambda p, _: with_program(p, b""), INVALID, ["program"]),
    ("model.json not JSON", edit_members({"models/model.json": b"{nope"}), INVALID, ["JSON"]),
    ("model.json missing", edit_members({"models/model.json": None}), INVALID, ["model.json"]),
    (
        "disallowed op",
        exported_fn(lambda p, X, y: torch.cumprod(X @ p, 0).sum() + y.sum()),
        INVALID,
        ["cumprod", "not allowed"],
    ),
    (
        "random op",
        exported_fn(lambda p, X, y: (torch.rand_like(X) @ p).sum() + y.sum()),
        INVALID,
        ["rand_like"],
    ),
    (
        "custom op",
        edit_graph(set_target(MATMUL, "torch.ops.evil.run.default")),
        INVALID,
        ["evil.run", "matmul"],
    ),
    (
        "higher-order op",
        edit_graph(set_target(MATMUL, "torch.ops.higher_order.cond")),
        INVALID,
        ["higher_order.cond"],
    ),
    ("print", edit_graph(set_target(MATMUL, "builtins.print")), INVALID, ["builtins.print"]),
    (
        "in-place op",
        edit_graph(set_target(MATMUL, "torch.ops.aten.add_.Tensor")),
        INVALID,
        ["add_"],
    ),
    (
        "unknown overload",
        edit_graph(set_target(MATMUL, "torch.ops.aten.mm.nope")),
        INVALID,
        ["mm.nope"],
    ),
    ("undefined value", edit_graph(undefined_input), INVALID, ["ghost"]),
    ("symbolic shape", edit_graph(symbolic), INVALID, ["static shapes"]),
    ("huge declared value", edit_graph(huge_value), EXHAUSTED, ["matmul", "elements"]),
    ("huge param_shape", field("param_shape", [10**9]), EXHAUSTED, ["param_shape"]),
    ("wrong param_shape", field("param_shape", [4]), INVALID, ["param_shape", "[3]"]),
    ("unknown output_loss", field("output_loss", "hinge"), INVALID, ["output_loss"]),
    ("wrong data shape", data_edit(X=np.zeros((N + 1, D))), INVALID, ["data.X", "[5, 3]"]),
    ("wrong data dtype", data_edit(X=np.zeros((N, D), np.float32)), INVALID, ["data.X", "float64"]),
    ("missing data", data_edit(y=None), INVALID, ["data.y"]),
    ("extra data", data_edit(z=np.zeros(2)), INVALID, ["data.z"]),
    ("non-scalar output", exported_fn(lambda p, X, y: X @ p - y), INVALID, ["scalar output"]),
    ("lies about a shape", edit_graph(lying_reshape), INVALID, ["reshape", "declared shape"]),
    (
        "shapes that cannot meet",
        edit_graph(mismatched_matmul),
        INVALID,
        ["matmul", "declared shapes"],
    ),
    (
        "outer product declared small",
        lambda p, path: edit_graph(small_outer)(valid(outer), path),
        INVALID,
        ["mul", "declared shape [1, 1]"],
    ),
    ("raises when evaluated", out_of_range_rows, INVALID, ["raised", "index_select"]),
    (
        "cross_entropy on floats",
        exported_fn(lambda p, X: X @ p, loss="cross_entropy"),
        INVALID,
        ["data.y", "int64"],
    ),
]


@pytest.mark.parametrize(("name", "make", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_hostile_program_refused_and_payload_never_runs(client, tmp_path, name, make, code, words):
    marker = tmp_path / "payload-ran"
    problem = make(valid(), str(marker))
    with pytest.raises(HessianError) as info:
        client.create_problem(problem)
    assert info.value.code == code, info.value.message
    for word in words:
        assert word in info.value.message, (word, info.value.message)
    assert not marker.exists(), "the pickle payload ran"
    # the server keeps serving: a valid exported program still steps
    assert client.newton_step(valid(), np.zeros(D)).params.shape == (D,)


def test_payloads_are_live(tmp_path):
    """Control: the payloads of the cases above do run when unpickled, so not running is
    the server's doing."""
    for i, make in enumerate((payload_pickle, payload_torch_save)):
        marker = tmp_path / f"ran-{i}"
        raw = make(str(marker))
        if raw[:2] == b"PK":
            torch.load(io.BytesIO(raw), weights_only=False)
        else:
            pickle.loads(raw)
        assert marker.exists()


def test_case_count():
    assert len(CASES) >= 20


def test_exported_newton_step_and_run_match_catalogue(client):
    """An exported least-squares twin: same Newton step and same run records as the catalogue
    least_squares objective (l2 = 0.1 = 2 x 0.05, no intercept) on the same data."""
    tensors = data()
    twin = valid()
    catalogue = problems.least_squares(tensors["X"], tensors["y"], l2=0.1)
    x = np.random.default_rng(3).normal(size=D)
    ours = client.newton_step(twin, x, backend="autograd")
    ref = client.newton_step(catalogue, x, backend="autograd")
    np.testing.assert_allclose(ours.params, ref.params, rtol=1e-12, atol=1e-14)
    runs = [
        client.start_run(p, x, method="newton_cg", backend="autograd", stopping=STOP)
        for p in (twin, catalogue)
    ]
    assert all(run.result(timeout=60).status == "FINISHED" for run in runs)
    a, b = (run.records() for run in runs)
    assert len(a) == len(b) >= 2
    for ra, rb in zip(a, b, strict=True):
        assert ra.loss == pytest.approx(rb.loss, rel=1e-10)


def test_cli_runs_an_exported_file_like_the_catalogue(server, capsys, tmp_path):
    """`hessian run --exported FILE.pt2 --data data.npz --params x.npy --json` gives the
    records of the same run of catalogue least_squares; a missing file is a one-line error."""
    from hessian_client.cli import main

    tensors = data()
    problem = valid()
    (tmp_path / "ls.pt2").write_bytes(problem.exported.program)
    np.savez(tmp_path / "data.npz", **{k: v.numpy() for k, v in tensors.items()})
    np.save(tmp_path / "x.npy", np.random.default_rng(5).normal(size=D))
    common = ["--data", str(tmp_path / "data.npz"), "--params", str(tmp_path / "x.npy")]
    common += ["--method", "newton", "--backend", "autograd", "--max-iterations", "3", "--json"]

    def cli(*args: str) -> tuple[int, list, str]:
        code = main(["--address", server.address, "run", *args])
        out = capsys.readouterr()
        return code, [json.loads(line) for line in out.out.splitlines()], out.err

    code, ours, err = cli("--exported", str(tmp_path / "ls.pt2"), *common)
    assert code == 0, err
    code, ref, err = cli("--objective", "least_squares", "--option", "l2=0.1", *common)
    assert code == 0, err
    assert len(ours) == len(ref) >= 3
    for a, b in zip(ours[:-1], ref[:-1], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
    code, _, err = cli("--exported", str(tmp_path / "missing.pt2"), *common)
    assert code != 0 and "missing.pt2" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("--objective", "exported", *common)
    assert code != 0 and "--exported FILE.pt2" in err and len(err.strip().splitlines()) == 1


def test_readme_exported_block_runs(server):
    """The README's exported-program example runs as written against a live server and its
    run lowers the loss below the start's (computed here in eager torch)."""
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Bring your own objective: exported programs\n")[1].split("\n## ")[0]
    block = section.split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(block.replace("Client()", f"Client({server.address!r})"), scope)
    start_loss = float(scope["loss"](scope["start"], scope["X"], scope["y"]))
    assert scope["result"].info.last_record.loss < start_loss
    assert scope["step"].params.shape == (4,)


def test_gauss_newton_needs_output_loss_and_curvature_analysis_runs(client):
    """A plain-loss program has no Gauss-Newton form (INVALID_ARGUMENT naming the curvature
    option); with loss='mse' Gauss-Newton and AnalyzeCurvature work on it."""
    with pytest.raises(HessianError) as info:
        client.newton_step(valid(), np.zeros(D), curvature="gauss_newton")
    assert info.value.code == INVALID and "curvature" in info.value.message
    tensors = data()
    outputs = problems.exported(lambda p, X: X @ p, torch.zeros(D, dtype=F64), tensors, loss="mse")
    x = np.random.default_rng(1).normal(size=D)
    step = client.newton_step(outputs, x, curvature="gauss_newton", learning_rate=1.0)
    X, y = tensors["X"].numpy(), tensors["y"].numpy()
    np.testing.assert_allclose(step.params, np.linalg.lstsq(X, y, rcond=None)[0], rtol=1e-9)
    curvature = client.analyze_curvature(outputs, x, top_k=1, curvature="gauss_newton")
    top = np.linalg.eigvalsh(2.0 / N * X.T @ X)[-1]  # the GGN of mean squared residuals
    assert curvature.top_eigenvalues[0] == pytest.approx(top, rel=1e-8)


def test_exported_problem_and_run_survive_a_restart(tmp_path):
    """Stored by content, the program outlives the process: after SIGKILL and a restart on
    the same data directory the run's records are there and a step by problem id (rebuilt
    from the stored bytes) equals the one before, bit for bit."""
    import signal

    from conftest import free_port, spawn_server
    from hessian_client import Client

    x = np.random.default_rng(2).normal(size=D)
    port = free_port()
    proc = spawn_server(tmp_path, port)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            pid = c.create_problem(valid())
            before = c.newton_step(pid, x).params
            run = c.start_run(pid, x, method="newton", stopping=STOP)
            assert run.result(timeout=60).status == "FINISHED"
            records = [(r.iteration, r.loss) for r in run.records()]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    proc = spawn_server(tmp_path, port)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            np.testing.assert_array_equal(c.newton_step(pid, x).params, before)
            again = c.run(run.id)
            assert [(r.iteration, r.loss) for r in again.records()] == records
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_evaluation_that_raises_mid_run_fails_the_run_not_the_server(client):
    """Rows indexed by params: fine at 0, out of range at 10. A run whose point is there
    ends FAILED with a message naming the node (a line-search trial there is only rejected:
    tests/test_exported_trials.py); a step there is INVALID_ARGUMENT; the server keeps
    serving."""

    def indexed(params, X):
        return ((params - 10.0) ** 2).sum() + X.index_select(0, params[:1].long()).sum()

    problem = problems.exported(indexed, torch.zeros(D, dtype=F64), {"X": data()["X"]})
    run = client.start_run(problem, np.full(D, 10.0), method="newton", stopping=STOP)
    with pytest.raises(HessianError, match="index_select"):
        run.result(timeout=60)
    assert client.get_run(run.id).status == "FAILED"
    with pytest.raises(HessianError) as info:
        client.newton_step(problem, np.full(D, 10.0))
    assert info.value.code == INVALID and "raised IndexError" in info.value.message
    assert client.newton_step(valid(), np.zeros(D)).params.shape == (D,)


def test_torch_export_load_would_run_the_pickled_constant(tmp_path):
    """Why the server parses archives itself: torch.export.load of the pickled-constant case
    runs its payload (torch 2.13 unpickles such constants with weights_only=False)."""
    marker = tmp_path / "ran-in-torch-export-load"
    blob = pickled_constant(valid(), str(marker)).exported.program
    with contextlib.suppress(Exception):  # the payload is no tensor: loading fails after it
        torch.export.load(io.BytesIO(blob))
    assert marker.exists()
