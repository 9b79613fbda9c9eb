"""Client SDK checks: the CLI's unreadable --data / --params files and options, minimize's
hessp shape check and empty x0, the callback's iterate when losses tie, maxiter 0's SciPy
status, problems.* option and data errors, and run results in the shape params were sent.

References are float64 numpy / SciPy on fresh draws from the test's `rng`.
"""

from __future__ import annotations

import argparse
import asyncio
import math

import numpy as np
import pytest
import torch
from hessian_client import (
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    aio,
    least_squares,
    minimize,
    problems,
)
from hessian_client.cli import build_problem, main
from hessian_client.minimize import minimize_async as aio_minimize
from hessian_client.tensors import decode
from scipy.optimize import minimize as scipy_minimize
from scipy.optimize import rosen, rosen_der, rosen_hess

NOWHERE = "127.0.0.1:1"  # usage mistakes are caught before any call: no server is asked


def _cli_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `hessian run ...` expecting a usage mistake: exit 2 and one line, its text."""
    code = main(["--address", NOWHERE, "run", "--objective", "logistic_regression", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def logreg(tmp_path, rng):
    """A logistic-regression .npz, its arrays and the directory holding it."""
    X = rng.normal(size=(40, 3))
    y = (X @ rng.normal(size=3) > 0).astype(np.float64)
    np.savez(tmp_path / "logreg.npz", X=X, y=y)
    return tmp_path, X, y


# D3: the CLI's --data / --params files and --option values


def test_cli_data_npz_loads_every_array_exactly(logreg):
    tmp, X, y = logreg
    args = argparse.Namespace(
        problem_id=None,
        objective="logistic_regression",
        exported=None,
        data=str(tmp / "logreg.npz"),
        option=[("l2", 0.25)],
    )
    problem = build_problem(args)
    np.testing.assert_array_equal(decode(problem.data["X"]), X)
    np.testing.assert_array_equal(decode(problem.data["y"]), y)
    assert problem.logistic_regression.l2 == 0.25


def test_cli_npy_given_to_data_is_a_usage_error(logreg, capsys):
    tmp, X, _ = logreg
    np.save(tmp / "x.npy", X)
    err = _cli_error(capsys, "--data", str(tmp / "x.npy"))
    assert "--data: expected an .npz of named arrays" in err and "shape [40, 3]" in err


def test_cli_truncated_npz_is_a_usage_error(logreg, capsys):
    tmp, _, _ = logreg
    (tmp / "cut.npz").write_bytes((tmp / "logreg.npz").read_bytes()[:200])
    err = _cli_error(capsys, "--data", str(tmp / "cut.npz"))
    assert "--data: cannot read" in err and "cut.npz" in err


def test_cli_corrupted_npz_member_is_a_usage_error(tmp_path, rng, capsys):
    np.savez_compressed(tmp_path / "c.npz", X=rng.normal(size=(200, 3)), y=np.ones(200))
    raw = bytearray((tmp_path / "c.npz").read_bytes())
    for i in (80, 90, 100):  # inside X's compressed bytes: a CRC or zlib failure on read
        raw[i] ^= 0xFF
    (tmp_path / "c.npz").write_bytes(bytes(raw))
    err = _cli_error(capsys, "--data", str(tmp_path / "c.npz"))
    assert "--data: cannot read" in err and "c.npz" in err


def test_cli_object_arrays_are_a_usage_error(tmp_path, capsys):
    np.savez(tmp_path / "obj.npz", X=np.array([{"a": 1}], dtype=object), y=np.ones(1))
    err = _cli_error(capsys, "--data", str(tmp_path / "obj.npz"))
    assert "--data: cannot read" in err and "allow_pickle" in err


@pytest.mark.parametrize("flag", ["--data", "--params"])
def test_cli_a_text_file_is_named_as_no_numpy_file(tmp_path, capsys, flag):
    # numpy read it as a pickle: "cannot read ... pickled (object) data", a text file
    path = tmp_path / "x.npz"
    path.write_text("1,2,3\n4,5,6\n")
    err = _cli_error(capsys, flag, str(path))
    assert f"{flag}: expected an .np" in err and "a file of neither kind" in err
    assert "pickle" not in err


def test_cli_an_empty_npz_is_read_as_no_arrays(tmp_path, capsys):
    # np.savez() of nothing starts "PK\x05\x06" (an empty zip): an .npz all the same
    np.savez(tmp_path / "none.npz")
    err = _cli_error(capsys, "--data", str(tmp_path / "none.npz"))
    assert "bad --data for logistic_regression" in err and "got []" in err


def test_cli_npz_given_to_params_is_a_usage_error(logreg, capsys):
    tmp, _, _ = logreg
    path = str(tmp / "logreg.npz")
    err = _cli_error(capsys, "--data", path, "--params", path)
    assert "--params: expected an .npy of one array" in err and "['X', 'y']" in err
    assert "<U1" not in err


def test_cli_option_of_the_wrong_type_names_its_key(logreg, capsys):
    tmp, _, _ = logreg
    err = _cli_error(capsys, "--data", str(tmp / "logreg.npz"), "--option", "l2=abc")
    assert "--option" in err and "l2: expected a real number, got 'abc'" in err


def test_cli_option_the_objective_does_not_have_is_named_with_the_ones_it_has(logreg, capsys):
    # it said "logistic_regression() got an unexpected keyword argument 'nonsense'"
    tmp, _, _ = logreg
    err = _cli_error(capsys, "--data", str(tmp / "logreg.npz"), "--option", "nonsense=1")
    assert "bad --option for logistic_regression: 'nonsense' is none of its names" in err
    assert "['X', 'y', 'l2', 'fit_intercept']" in err and "keyword argument" not in err


def test_cli_data_array_of_the_wrong_dtype_names_it(tmp_path, rng, capsys):
    X = rng.normal(size=(10, 2))
    np.savez(tmp_path / "b.npz", X=X + 1j, y=np.ones(10))
    err = _cli_error(capsys, "--data", str(tmp_path / "b.npz"))
    assert "bad --data" in err and "data.X: expected dtype float32, float64 or int64" in err


@pytest.mark.parametrize(
    ("arrays", "got"), [({"X": 1, "labels": 1}, "['X', 'labels']"), ({"X": 1}, "['X']")]
)
def test_cli_data_arrays_the_objective_does_not_take_are_named_with_the_ones_it_does(
    tmp_path, rng, capsys, arrays, got
):
    # it said "logistic_regression() got an unexpected keyword argument 'labels'" / "missing
    # 1 required positional argument"
    np.savez(tmp_path / "d.npz", **{k: rng.normal(size=(5, 2)) for k in arrays})
    err = _cli_error(capsys, "--data", str(tmp_path / "d.npz"))
    assert (
        f"bad --data for logistic_regression: expected an .npz of the arrays ['X', 'y'], "
        f"got {got}" in err
    )


def test_cli_exported_file_that_is_no_archive_says_what_it_lacks(tmp_path, capsys):
    np.savez(tmp_path / "model.npz", w=np.zeros(2))  # a zip, but no exported program
    code = main(["--address", NOWHERE, "run", "--exported", str(tmp_path / "model.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "0 models/model.json members, not 1" in err, err
    assert "unpack" not in err


def test_cli_exported_unknown_option_is_named_with_the_options_it_takes(tmp_path, capsys):
    (tmp_path / "g.pt2").write_bytes(b"not read: the option is refused first")
    code = main(["--address", NOWHERE, "run", "--exported", str(tmp_path / "g.pt2"),
                 "--option", "lossy=mse"])  # fmt: skip
    err = capsys.readouterr().err
    # it said "exported_archive() got an unexpected keyword argument 'lossy'"
    assert code == 2 and "'lossy' is none of its names [" in err and "'loss'" in err, err
    assert "program" not in err.split("none of its names")[1], err
    for option in ("data=1", "program=1"):  # Python's "got multiple values for argument"
        code = main(["--address", NOWHERE, "run", "--exported", str(tmp_path / "g.pt2"),
                     "--option", option])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and f"{option.split('=')[0]!r} is none of its names" in err, err


# D6: problems.* options and data


@pytest.mark.parametrize(
    ("build", "field", "expected"),
    [
        (lambda X, y: problems.logistic_regression(X, y, l2="abc"), "l2", "a real number"),
        (lambda X, y: problems.logistic_regression(X, y, l2=True), "l2", "a real number"),
        (
            lambda X, y: problems.logistic_regression(X, y, fit_intercept="no"),
            "fit_intercept",
            "True or False",
        ),
        (lambda X, y: problems.least_squares(X, y, fit_intercept=1), "fit_intercept", "True"),
        (lambda X, y: problems.rosenbrock(dim=2.5), "dim", "an integer"),
        (
            lambda X, y: problems.softmax_regression(X, y.astype(int), num_classes="2"),
            "num_classes",
            "an integer",
        ),
        (lambda X, y: problems.mlp(X, y, layer_sizes=3), "layer_sizes", "a sequence"),
        (lambda X, y: problems.mlp(X, y, layer_sizes=[3, 2.5]), "layer_sizes", "an integer"),
        (lambda X, y: problems.mlp(X, y, layer_sizes=[3, 1], activation=1), "activation", "str"),
        (lambda X, y: problems.logistic_regression(X + 1j, y), "data.X", "dtype float32"),
        (lambda X, y: problems.mse("abc"), "data.target", "dtype float32"),
        (
            lambda X, y: problems.softmax_regression(X, [[0], [1, 0]]),
            "data.labels",
            "a numeric array",
        ),
        (
            lambda X, y: problems.exported_archive(b"", {"X": X}, param_shape=[2.5]),
            "param_shape",
            "an integer",
        ),
        (
            lambda X, y: problems.exported_archive(b"", {"X": X}, param_shape=[3], loss="l1"),
            "loss",
            "mse or cross_entropy",
        ),
        # past the wire's int64 protobuf raised a bare ValueError naming no field
        (lambda X, y: problems.rosenbrock(2**70), "dim", "an integer in [1, 9223372036854775807]"),
        (lambda X, y: problems.rosenbrock(-3), "dim", "an integer in [1, 9223372036854775807]"),
        (
            lambda X, y: problems.softmax_regression(X, [0, 1] * 3, num_classes=2**64),
            "num_classes",
            "an integer in [1, ",
        ),
        (
            lambda X, y: problems.mlp(X, y, layer_sizes=[3, 2**70, 1]),
            "layer_sizes",
            "a sequence, each an integer in [1, ",
        ),
    ],
    ids=[
        "l2-str",
        "l2-bool",
        "fit_intercept-str",
        "fit_intercept-int",
        "dim-float",
        "num_classes-str",
        "layer_sizes-int",
        "layer_sizes-float",
        "activation-int",
        "X-complex",
        "target-str",
        "labels-ragged",
        "param_shape-float",
        "loss-unknown",
        "dim-past-int64",
        "dim-negative",
        "num_classes-past-int64",
        "layer_sizes-past-int64",
    ],
)
def test_problem_builders_name_the_field_at_fault(rng, build, field, expected):
    X, y = rng.normal(size=(6, 3)), rng.integers(0, 2, 6).astype(np.float64)
    with pytest.raises(InvalidArgument) as info:
        build(X, y)
    assert info.value.field == field
    assert expected in info.value.expected
    assert str(info.value).startswith(f"INVALID_ARGUMENT: {field}: expected ")


def test_problem_builders_take_numpy_scalars_and_arrays_exactly(rng):
    X, y = rng.normal(size=(8, 3)), rng.normal(size=8)
    l2 = float(rng.uniform(0.01, 1.0))
    sizes = np.array([3, int(rng.integers(2, 9)), 1])
    mlp = problems.mlp(X, y, layer_sizes=sizes, l2=np.float64(l2), activation="tanh")
    assert list(mlp.mlp.layer_sizes) == sizes.tolist() and mlp.mlp.l2 == l2
    np.testing.assert_array_equal(decode(mlp.data["X"]), X)
    ls = problems.least_squares(X, y, l2=l2, fit_intercept=np.bool_(True))
    assert ls.least_squares.l2 == l2 and ls.least_squares.fit_intercept is True
    assert problems.rosenbrock(dim=np.int64(7)).rosenbrock.dim == 7
    unset = problems.logistic_regression(X, (y > 0) * 1.0, l2=None)  # None: server default
    assert unset.logistic_regression.l2 == 0.0


# D4: minimize's hessp shape and an empty x0


def _quadratic(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    M = rng.normal(size=(n, n))
    return M @ M.T + n * np.eye(n), rng.normal(size=n)


@pytest.mark.parametrize("method", ["auto", "newton_cg"])
@pytest.mark.parametrize(
    ("wrong", "shape"),
    [(lambda hv: hv[:2], "(2,)"), (lambda hv: hv[:, None], "(3, 1)")],
    ids=["sliced", "column"],
)
def test_hessp_of_the_wrong_shape_is_named(address, rng, method, wrong, shape):
    A, b = _quadratic(rng, 3)
    with pytest.raises(InvalidArgument) as info:
        minimize(lambda x: 0.5 * x @ A @ x - b @ x, rng.normal(size=3),
                 jac=lambda x: A @ x - b, hessp=lambda x, v: wrong(A @ v), method=method,
                 address=address)  # fmt: skip
    assert info.value.field == "hessp"
    assert info.value.message == f"hessp: expected H v of shape (3,), like x, got {shape}"


def test_hessp_dense_hessian_is_the_float64_matrix(address, rng):
    n = int(rng.integers(3, 9))
    A, b = _quadratic(rng, n)
    res = minimize(lambda x: 0.5 * x @ A @ x - b @ x, rng.normal(size=n),
                   jac=lambda x: A @ x - b, hessp=lambda x, v: A @ v, method="auto",
                   address=address)  # fmt: skip
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.hess, A, rtol=1e-14, atol=0)


@pytest.mark.parametrize("method", ["newton", "auto"])
def test_scalar_jac_and_hess_of_one_parameter_are_taken_as_scipy_takes_them(address, rng, method):
    a, b = rng.uniform(0.5, 2.0), rng.normal()
    fun, jac, hess = (
        (lambda x: 0.5 * a * x[0] ** 2 - b * x[0]),
        (lambda x: a * x[0] - b),
        (lambda x: a),
    )  # scalars, as SciPy accepts for n = 1
    res = minimize(fun, np.array([rng.normal()]), jac=jac, hess=hess, method=method,
                   address=address)  # fmt: skip
    np.testing.assert_allclose(res.x, [b / a], rtol=1e-12)


@pytest.mark.parametrize(
    "name, jac, hess, shape",
    [
        ("jac", lambda A, b: lambda x: (A @ x - b)[:, None], None, "(3, 1)"),
        ("jac", lambda A, b: lambda x: (A @ x - b)[:2], None, "(2,)"),
        ("hess", None, lambda A: lambda x: A.ravel(), "(9,)"),
    ],
)
def test_jac_or_hess_of_the_wrong_shape_is_named(address, rng, name, jac, hess, shape):
    A, b = _quadratic(rng, 3)
    with pytest.raises(InvalidArgument) as info:
        minimize(lambda x: 0.5 * x @ A @ x - b @ x, rng.normal(size=3),
                 jac=(jac or (lambda A, b: lambda x: A @ x - b))(A, b),
                 hess=(hess or (lambda A: lambda x: A))(A), method="newton",
                 address=address)  # fmt: skip
    assert info.value.field == name
    assert info.value.message.endswith(f"got {shape}")


def test_an_empty_x0_is_named(address):
    with pytest.raises(InvalidArgument) as info:
        least_squares(lambda x: np.zeros(3), np.zeros(0), lambda x: np.zeros((3, 0)),
                      address=address)  # fmt: skip
    assert info.value.field == "x0" and "got (0,)" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        minimize(lambda x: 0.0, [], jac=lambda x: x, address=address)
    assert info.value.field == "x0"


# D5: the callback's x is the record's own iterate


def test_callback_x_is_the_iterate_when_losses_tie(address, rng):
    x0 = rng.normal(size=int(rng.integers(2, 6)))
    seen: list[tuple[int, float, np.ndarray]] = []
    res = minimize(lambda x: float(x @ x), x0, jac=lambda x: 2 * x, method="gradient_descent",
                   options={"maxiter": 4, "learning_rate": 1.0},
                   callback=lambda r: seen.append((r.nit, r.fun, r.x.copy())),
                   address=address)  # fmt: skip
    # x - 1.0 * 2x = -x exactly: every iterate has the loss of x0
    assert [nit for nit, _, _ in seen] == [0, 1, 2, 3, 4]
    for nit, fun, x in seen:
        np.testing.assert_array_equal(x, x0 if nit % 2 == 0 else -x0)
        assert fun == float(x @ x)
    np.testing.assert_array_equal(res.x, x0)


def _rejections_seen_in_place(address: str, x0: np.ndarray) -> int:
    """Levenberg-Marquardt on Rosenbrock from x0: every callback x is its record's point (x
    moves by the record's step norm after an accepted step, not at all after a rejected
    one); the number of rejected steps."""
    seen: list[tuple[int, float, np.ndarray]] = []
    res = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="levenberg_marquardt",
                   options={"maxiter": 60}, address=address,
                   callback=lambda r: seen.append((r.nit, r.fun, r.x.copy())))  # fmt: skip
    with Client(address) as client:
        records = client.run(res.run_id).records()
    assert [nit for nit, _, _ in seen] == [r.iteration for r in records]
    np.testing.assert_array_equal(seen[0][2], x0)
    for (_, fun, x), record in zip(seen, records, strict=True):
        assert fun == rosen(x) == record.loss  # the point the record was taken at
    rejected = 0
    for i, record in enumerate(records[:-1]):
        x, x_next = seen[i][2], seen[i + 1][2]
        if record.step_accepted:
            assert np.linalg.norm(x_next - x) == pytest.approx(record.step_norm, rel=1e-12)
        else:
            rejected += 1
            np.testing.assert_array_equal(x_next, x)
    return rejected


def test_callback_x_stays_put_across_rejected_steps(address, rng):
    # far starts, until one has Levenberg-Marquardt reject a step (most do)
    for _ in range(8):
        if _rejections_seen_in_place(address, rng.uniform(-5.0, 5.0, 4)):
            return
    pytest.fail("no start had a rejected step: the test did not test it")


# D7: maxiter 0 is SciPy's max-iterations status


@pytest.mark.parametrize("method", ["newton", "gradient_descent"])
def test_maxiter_zero_is_status_1(address, rng, method):
    x0 = rng.uniform(-2.0, 2.0, 3)
    res = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method=method,
                   options={"maxiter": 0}, address=address)  # fmt: skip
    ref = scipy_minimize(rosen, x0, jac=rosen_der, method="BFGS", options={"maxiter": 0})
    assert (res.status, res.nit, res.success) == (ref.status, ref.nit, ref.success) == (1, 0, False)
    np.testing.assert_array_equal(res.x, x0)
    assert res.fun == rosen(x0)
    assert "max_iterations" in res.message


# D8: run results in the shape the parameters were sent


def _softmax_gd(X, labels, W, lr, l2):
    """One gradient-descent step of mean softmax cross-entropy + 0.5 l2 ||W[:d]||^2."""
    Z = np.hstack([X, np.ones((len(X), 1))])
    logits = Z @ W
    P = np.exp(logits - logits.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    Y = np.eye(W.shape[1])[labels]
    grad = Z.T @ (P - Y) / len(X)
    grad[:-1] += l2 * W[:-1]
    return W - lr * grad


def test_run_result_params_have_the_shape_sent(address, rng):
    target = rng.normal(size=(3, 4))
    x0 = rng.normal(size=(3, 4))
    newton = {"method": "newton", "stopping": {"max_iterations": 1}}
    with Client(address) as client:
        pid = client.create_problem(problems.mse(target))
        step = client.newton_step(pid, x0)
        for watch in (False, True):
            result = client.start_run(pid, x0, watch=watch, **newton).result(timeout=60)
            assert result.params.shape == step.params.shape == (3, 4)
            np.testing.assert_allclose(result.params, target, rtol=1e-12, atol=1e-14)
            np.testing.assert_array_equal(result.info.final_params, result.params)
        fetched = client.run(result.info.run_id).result(timeout=60)  # shape unknown here
        wire = client.get_run(result.info.run_id, include_params=True).raw.final_params
        assert fetched.params.shape == tuple(wire.shape)
        np.testing.assert_array_equal(fetched.params.reshape(3, 4), result.params)

        sent = torch.from_numpy(x0)
        result = client.start_run(pid, sent, **newton).result(timeout=60)
        assert isinstance(result.params, torch.Tensor) and tuple(result.params.shape) == (3, 4)
        np.testing.assert_allclose(result.params.numpy(), target, rtol=1e-12, atol=1e-14)

        X, k, lr, l2 = rng.normal(size=(30, 4)), 3, 0.5, 0.1
        labels = rng.integers(0, k, 30)
        W = rng.normal(size=(5, k))
        problem = problems.softmax_regression(X, labels, num_classes=k, l2=l2)
        run = client.start_run(problem, W, method="gradient_descent", learning_rate=lr,
                               stopping={"max_iterations": 1})  # fmt: skip
        result = run.result(timeout=60)
        step = client.gradient_step(problem, W, learning_rate=lr)
        assert result.params.shape == step.params.shape == (5, k)
        np.testing.assert_allclose(result.params, _softmax_gd(X, labels, W, lr, l2), rtol=1e-12)


def test_run_result_says_why_it_stopped_as_the_tour_reads_it(address, rng):
    """README's tour reads `result.stop_reason` (RunResult had only `.info.stop_reason`):
    a Newton run on a strictly convex quadratic stops at the gradient tolerance."""
    target = rng.normal(size=6)
    with Client(address) as client:
        result = client.start_run(problems.mse(target), np.zeros(6), method="newton").result(60)
    assert result.stop_reason == "gradient_tolerance" == result.info.stop_reason
    assert result.converged is True and result.message == result.info.message != ""
    np.testing.assert_allclose(result.params, target, rtol=1e-12)


def test_aio_run_result_params_have_the_shape_sent(address, rng):
    target, x0 = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))

    async def go() -> np.ndarray:
        async with aio.Client(address) as client:
            run = await client.start_run(problems.mse(target), x0, method="newton",
                                         stopping={"max_iterations": 1})  # fmt: skip
            return (await run.result(timeout=60)).params

    params = asyncio.run(go())
    assert params.shape == (2, 5)
    np.testing.assert_allclose(params, target, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("call", "field", "expected"),
    [
        (lambda c: c.start_run(_ROSEN, [0.0, 0.0], stopping={"max_iterations": "ten"}),
         "stopping.max_iterations", "an integer"),
        (lambda c: c.start_run(_ROSEN, [0.0, 0.0], stopping={"max_iterations": 2**70}),
         "stopping.max_iterations", "an integer at most 9223372036854775807"),
        (lambda c: c.newton_step(_ROSEN, [0.0, 0.0], learning_rate="abc"),
         "options.learning_rate", "a number"),
        (lambda c: c.start_run(_ROSEN, [0.0, 0.0], curvature_seed=1.5), "options.seed",
         "an integer"),
        (lambda c: c.start_run(_ROSEN, seed=-1), "seed", "an integer in [0, 18446744073709551615]"),
        (lambda c: c.start_run(_ROSEN, seed=2**64), "seed", "an integer in [0, "),
        (lambda c: c.sample(-1, [[2]]), "seed", "an integer in [0, "),
        (lambda c: c.sample(0, 3), "shapes", "a list of shapes"),
        (lambda c: c.sample(0, [[2.5]]), "shapes", "an integer in [0, "),
        (lambda c: c.get_run(5), "run_id", "a string"),
        (lambda c: c.cancel_run(None), "run_id", "a string"),
        (lambda c: c.delete_problem(7), "problem_id", "a string"),
        (lambda c: c.start_run(_ROSEN, [0.0, 0.0], name=5), "name", "a string"),
        (lambda c: list(c.list_runs(page_size="5")), "page_size", "an integer in [0, "),
        (lambda c: c.newton_step(_ROSEN, [0.0, 0.0], timeout="a"), "timeout",
         "a number of seconds in (0, "),
        (lambda c: c.newton_step(_ROSEN, [0.0, 0.0], timeout=0), "timeout",
         "a number of seconds in (0, "),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_is_invalid_argument_naming_it_before_sending(
    call, field, expected
):
    # protobuf's TypeError escaped ("'str' object cannot be interpreted as an integer")
    with Client(NOWHERE) as client, pytest.raises(InvalidArgument) as err:
        call(client)
    assert err.value.field == field and f"expected {expected}" in err.value.message


_ROSEN = problems.rosenbrock(dim=2)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"page_size": -1}, "page_size"), ({"status": "bogus"}, "status")]
)
def test_list_runs_refuses_its_arguments_when_called_not_at_the_first_page(kwargs, field):
    """list_runs was a generator: a bad page_size or status passed unnoticed until the
    caller iterated (and a caller storing the iterator heard of it elsewhere)."""
    with Client(NOWHERE) as client, pytest.raises(InvalidArgument) as err:
        client.list_runs(**kwargs)
    assert err.value.field == field

    async def aio_call() -> None:
        async with aio.Client(NOWHERE) as client:
            client.list_runs(**kwargs)

    with pytest.raises(InvalidArgument) as err:
        asyncio.run(aio_call())
    assert err.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        ({"timeout": -1}, "timeout", "a number of seconds in (0, "),
        ({"token": "tok\x00en"}, "token", "printable ASCII"),
        ({"token": 5}, "token", "a string"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file", "a readable PEM file"),
    ],
)
def test_client_arguments_of_the_wrong_kind_are_invalid_argument_naming_them(
    kwargs, field, expected
):
    with pytest.raises(InvalidArgument) as err:
        Client(NOWHERE, **kwargs)
    assert err.value.field == field and f"expected {expected}" in err.value.message
    assert "tok\x00en" not in err.value.message  # a token is never echoed


@pytest.mark.parametrize("address", [50051, b"127.0.0.1:50051", [50051], ["127.0.0.1:1", 2]])
def test_an_address_that_is_no_text_is_invalid_argument_naming_it(address):
    # Client(50051) was "TypeError: 'int' object is not iterable"
    with pytest.raises(InvalidArgument) as err:
        Client(address)
    assert err.value.field == "address" and "expected host:port (a string)" in err.value.message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_a_half_precision_tensor_is_refused_naming_its_dtype(dtype):
    # bfloat16 said "got 'Got unsupported ScalarType BFloat16'" (numpy has no bfloat16)
    with Client(NOWHERE) as client, pytest.raises(InvalidArgument) as err:
        client.newton_step(problems.rosenbrock(dim=2), torch.zeros(2, dtype=dtype))
    assert err.value.field == "params"
    assert err.value.message.endswith(f"expected dtype float32, float64 or int64, got "
                                      f"'{str(dtype).removeprefix('torch.')}'")  # fmt: skip


def test_a_sparse_tensor_keeps_numpys_own_words():
    # the dtype branch made it "expected dtype float32, ..., got 'float32'"
    with Client(NOWHERE) as client, pytest.raises(InvalidArgument) as err:
        client.newton_step(problems.rosenbrock(dim=2), torch.zeros(2).to_sparse())
    assert err.value.field == "params" and "to_dense" in err.value.message


def test_a_token_read_with_its_newline_is_sent_stripped():
    with Client(NOWHERE, token="  tok-A\n") as client:
        assert ("authorization", "Bearer tok-A") in client.metadata


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--objective", "rosenbrock", "--seed", "-1"),
        ("--timeout", "0", "info"),
        ("--timeout", "-1", "info"),
        ("runs", "--limit", "0"),
        ("runs", "--limit", "-1"),
        ("runs", "--limit", "99999999999999999999"),  # past islice's limit: a traceback
        # a problem named twice or not at all: one of them was ignored, or the message wrong
        ("run", "--problem-id", ""),
        ("run", "--problem-id", "p-x", "--objective", "rosenbrock"),
        ("run", "--problem-id", "p-x", "--option", "dim=3"),
        ("run", "--objective", "rosenbrock", "--option", "dim=3", "--option", "dim=4"),
        ("run", "--exported", ""),
        ("run", "--objective", "rosenbrock", "--option", "dim=100000000000000000000000"),
    ],
)
def test_cli_values_out_of_range_are_usage_errors(capsys, args):
    try:
        code = main(["--address", NOWHERE, *args])
    except SystemExit as exc:  # argparse's refusal of a flag's value
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err


def test_the_sdks_own_refusals_cut_echoed_input_as_the_server_does():
    # README: echoed input is cut to 200 characters with its full length noted
    with Client(NOWHERE) as client, pytest.raises(InvalidArgument) as err:
        client.newton_step(_ROSEN, [0.0, 0.0], method="n" * 5000)
    shown = repr("n" * 5000)
    assert err.value.message.endswith(f"got {shown[:200]}... ({len(shown)} characters)")
    assert len(err.value.message) < 400


@pytest.mark.parametrize(
    "build",
    [lambda: problems.rosenbrock(dim=0),
     lambda: problems.softmax_regression(np.zeros((3, 2)), np.array([0, 1, 1]), num_classes=0)],
)  # fmt: skip
def test_an_integer_option_of_0_is_refused_not_sent_as_unset(build):
    # proto3 sends 0 as unset: rosenbrock(dim=0) became dim 2 on the server, silently
    with pytest.raises(InvalidArgument) as err:
        build()
    assert "0 reads as unset: leave it out for the default" in err.value.message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"params": [0.0, 0.0], "seed": 1}, "seed"), ({"init": "normal"}, "init"),
     ({"params": [0.0, 0.0], "init": "uniform"}, "init")],
)  # fmt: skip
def test_a_start_argument_that_would_be_ignored_is_refused_naming_it(kwargs, field):
    # a seed beside params, or an init with no seed to draw with, was silently dropped
    with Client(NOWHERE) as client, pytest.raises(InvalidArgument) as err:
        client.start_run(_ROSEN, **kwargs)
    assert err.value.field == field
    if "params" in kwargs and field == "init":
        assert "objective_default when params are given" in err.value.message


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:", "localhost:http",
                                     ["127.0.0.1:5", "127.0.0.1:0"]])  # fmt: skip
def test_an_address_whose_port_is_no_tcp_port_is_refused_naming_address(address):
    # gRPC wrapped 99999 round to 34463 and reported a failure to connect there
    with pytest.raises(InvalidArgument) as err:
        Client(address)
    assert err.value.field == "address" and "a port in 1..65535" in err.value.message


@pytest.mark.parametrize("address", ["[::1]:50051", "dns:///h:50051", "google-c2p:///h",
                                     "unix:/tmp/x.sock"])  # fmt: skip
def test_addresses_whose_port_is_grpcs_to_choose_or_parse_are_accepted(address):
    with Client(address) as client:
        assert client.address == address


@pytest.mark.parametrize("start", [3.0, "3", 10**30, -1, True])
def test_a_from_iteration_that_is_no_iteration_is_refused_naming_it(start):
    """3.0 and "3" raised protobuf's TypeError, 10**30 its "Value out of range"."""
    with Client(NOWHERE) as client:
        run = client.run("r-any")
        with pytest.raises(InvalidArgument) as err:
            next(iter(run.stream(from_iteration=start)))
        assert err.value.field == "from_iteration" and not err.value.from_server

    async def watch() -> None:
        async with aio.Client(NOWHERE) as client:
            await anext(aiter(client.run("r-any").stream(from_iteration=start)))

    with pytest.raises(
        InvalidArgument, match=r"INVALID_ARGUMENT: from_iteration: expected an integer in"
    ):
        asyncio.run(watch())


BEFORE_START = [
    ({"x0": "abc"}, "x0"),
    ({"options": {"speculative": "no"}}, "options.speculative"),
    ({"name": 5}, "name"),
    ({"resume": 5}, "resume"),
    ({"callback": 5}, "callback"),
]


@pytest.mark.parametrize(("change", "field"), BEFORE_START, ids=[f for _, f in BEFORE_START])
def test_minimize_arguments_of_the_wrong_kind_are_named_before_any_call(change, field):
    """Each escaped as numpy's ValueError, protobuf's TypeError or (callback) a TypeError
    after the run had started; now InvalidArgument naming the argument, with no call."""
    kw = {"x0": np.ones(3), "jac": lambda x: 2 * x, "address": NOWHERE, **change}
    with pytest.raises(InvalidArgument) as info:
        minimize(lambda x: float(x @ x), **kw)
    assert info.value.field == field and not info.value.from_server
    assert not getattr(info.value, "run_id", "")  # refused before any run started
    with pytest.raises(InvalidArgument) as info:  # the asyncio variant, before its call too
        asyncio.run(aio_minimize(lambda x: float(x @ x), **kw))
    assert info.value.field == field and not info.value.from_server


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda a, x0: minimize(lambda x: None, x0, jac=lambda x: 2 * x, address=a), "fun"),
        (
            lambda a, x0: minimize(
                lambda x: float(x @ x), x0, jac=lambda x: 2 * x, hessp=lambda x, v: "Hv",
                method="newton_cg", address=a,
            ),
            "hessp",
        ),
        (lambda a, x0: least_squares(lambda x: None, x0, lambda x: np.eye(3), address=a), "fun"),
    ],
    ids=["fun-None", "hessp-not-numbers", "residuals-None"],
)  # fmt: skip
def test_a_function_returning_what_is_not_numbers_is_named(address, call, field):
    """A loss of None was taken as NaN (the run FAILED "not finite"), least_squares blamed
    jac for it, and hessp's text escaped as numpy's ValueError."""
    with pytest.raises(InvalidArgument) as info:
        call(address, np.ones(3))
    assert info.value.field == field and not info.value.from_server


def test_torch_values_that_require_grad_are_taken_as_x0_and_from_hessp(address, rng):
    """As jac's and hess's already were (torch's RuntimeError before), against the same
    run from numpy values."""
    A, b = _quadratic(rng, 3)
    x0 = rng.normal(size=3)
    kw = {"jac": lambda x: A @ x - b, "method": "newton_cg", "address": address}

    def loss(x):
        return 0.5 * x @ A @ x - b @ x

    plain = minimize(loss, x0, hessp=lambda x, v: A @ v, **kw)
    grad_x0 = torch.tensor(x0, requires_grad=True)
    held = minimize(loss, grad_x0, hessp=lambda x, v: torch.tensor(A @ v, requires_grad=True), **kw)
    np.testing.assert_array_equal(held.x, plain.x)
    np.testing.assert_allclose(plain.x, np.linalg.solve(A, b), rtol=1e-10)


def test_a_closed_client_is_a_typed_error_naming_it():
    """grpc's bare ValueError (sync) or UsageError (asyncio) before."""
    client = Client(NOWHERE)
    client.close()
    with pytest.raises(FailedPrecondition) as info:
        client.info()
    assert info.value.field == "client"

    async def closed() -> None:
        async_client = aio.Client(NOWHERE)
        await async_client.close()
        with pytest.raises(FailedPrecondition) as info:
            await async_client.info()
        assert info.value.field == "client"

    asyncio.run(closed())


@pytest.mark.parametrize("address", ["localhost", "10.0.0.7", "[::1]", ["10.0.0.7"]])
def test_an_address_without_a_port_is_refused_not_dialled_at_443(address):
    with pytest.raises(InvalidArgument) as err:
        Client(address)
    assert err.value.field == "address" and "no port given" in str(err.value)


@pytest.mark.parametrize("timeout", [1e30, 1e10, math.inf])
def test_a_timeout_grpc_cannot_hold_is_refused_not_an_instant_deadline(timeout):
    # Client(timeout=1e30) failed every call at once with DEADLINE_EXCEEDED
    with pytest.raises(InvalidArgument) as err:
        Client("127.0.0.1:1", timeout=timeout)
    assert err.value.field == "timeout" and "(a year)" in str(err.value)
    Client("127.0.0.1:1", timeout=365 * 24 * 3600.0).close()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda run: run.result(timeout="soon"), "timeout"),
        (lambda run: run.wait(timeout=float("nan")), "timeout"),
        (lambda run: list(run.stream(timeout=float("nan"))), "timeout"),
        (lambda run: list(run.stream(reconnect_timeout="x")), "reconnect_timeout"),
        (lambda run: list(run.stream(reconnect_timeout=-1)), "reconnect_timeout"),
    ],
)
def test_a_run_handle_refuses_a_timeout_that_is_no_number_before_calling(call, field):
    """wait and result asked the server where to start before looking at their timeout
    (a bad one was refused only after that call: UNAVAILABLE here); stream's
    reconnect_timeout was not checked at all ("x" failed with a bare TypeError at the
    first reconnect, -1 gave up at once)."""
    with Client(NOWHERE) as client, pytest.raises(InvalidArgument) as err:
        call(client.run("r-anything"))
    assert err.value.field == field

    async def in_asyncio() -> None:
        async with aio.Client(NOWHERE) as client:
            with pytest.raises(InvalidArgument) as err:
                await client.run("r-anything").wait(timeout=float("nan"))
            assert err.value.field == "timeout"

    asyncio.run(in_asyncio())


@pytest.mark.parametrize("option", ["step_policy", "method", "backend", "curvature"])
def test_an_unknown_option_name_is_refused_under_the_field_the_server_names(option):
    # the SDK said "step_policy", the server "options.step_policy" for the same mistake
    with Client(NOWHERE) as client, pytest.raises(InvalidArgument) as err:
        client.newton_step(problems.rosenbrock(dim=2), np.zeros(2), **{option: "bogus"})
    assert err.value.field == f"options.{option}"


LIMIT = 1 << 20  # a client's message limit; 200,000 float64 values (1.6 MB) exceed it
TOO_MANY = 200_000


@pytest.mark.parametrize(
    ("field", "call"),
    [
        ("problem", lambda c: c.create_problem(problems.mse(np.zeros(TOO_MANY)))),
        ("params", lambda c: c.gradient_step(problems.rosenbrock(dim=3), np.zeros(TOO_MANY))),
        ("problem", lambda c: c.newton_step(problems.mse(np.zeros(TOO_MANY)), np.zeros(3))),
        ("initial_params", lambda c: c.start_run("p-x", np.zeros(TOO_MANY))),
        ("initial_params", lambda c: c.start_run("p-x", np.zeros(TOO_MANY), watch=True)),
        ("inputs", lambda c: c.predict("p-x", np.zeros(3), inputs=np.zeros((TOO_MANY, 3)))),
    ],
)
def test_a_request_over_the_message_limit_is_refused_naming_its_field(field, call):
    # gRPC's own refusal was "Sent message larger than max (1600034 vs. 1048576)", no field
    with (
        Client(NOWHERE, max_message_bytes=LIMIT) as client,
        pytest.raises(ResourceExhausted) as err,
    ):
        call(client)
    assert err.value.field == field and f"{LIMIT:,}" in str(err.value)


def test_a_request_most_of_whose_bytes_are_a_string_is_named_by_it():
    """A 1 KiB client limit and a StartRun whose bytes are almost all its name (256 emoji,
    1,024 bytes) was "stopping: the request is ...", `stopping` being 2 bytes; a request
    that no one field dominates is "request"."""
    with Client(NOWHERE, max_message_bytes=1024) as client:
        with pytest.raises(ResourceExhausted) as err:
            client.start_run("p-x", np.zeros(3), name="\U0001f600" * 256)
        assert err.value.field == "name"
        with pytest.raises(ResourceExhausted) as err:
            # 440 bytes of name, ~490 of params, 102 of problem id: none holds most
            client.start_run("p-" + "x" * 100, np.zeros(60), name="\U0001f600" * 110)
        assert err.value.field == "request"


def test_the_asyncio_client_refuses_an_oversized_request_the_same_way():
    async def main() -> None:
        async with aio.Client(NOWHERE, max_message_bytes=LIMIT) as ac:
            await ac.create_problem(problems.mse(np.zeros(TOO_MANY)))

    with pytest.raises(ResourceExhausted) as err:
        asyncio.run(main())
    assert err.value.field == "problem"


def test_minimize_names_an_x0_too_large_to_send():
    # 9 M float64 values: 72 MB past the default 64 MiB message
    x0 = np.zeros(9_000_000)
    with pytest.raises(ResourceExhausted) as err:
        minimize(lambda x: float(x @ x), x0, jac=lambda x: 2 * x, address=NOWHERE)
    assert err.value.field == "x0"
    with pytest.raises(ResourceExhausted) as err:
        asyncio.run(aio_minimize(lambda x: float(x @ x), x0, jac=lambda x: 2 * x, address=NOWHERE))
    assert err.value.field == "x0"


@pytest.mark.parametrize("bad", [0, -1, 1023, 2**31, 1.5, "64MiB", None])
def test_a_message_limit_grpc_cannot_use_is_refused(bad):
    # -1 is gRPC's "no limit"; a float or a string failed inside gRPC's channel options
    with pytest.raises(InvalidArgument) as err:
        Client(NOWHERE, max_message_bytes=bad)
    assert err.value.field == "max_message_bytes"


def test_integer_parameters_are_sent_as_the_real_numbers_they_are(address, rng):
    """A list like [1, 2] was sent as int64 and refused by the server ("params.dtype:
    expected FLOAT32 or FLOAT64, got INT64"); minimize took it. Integer and bool parameters
    are now sent as float64: the answers equal the float ones bit for bit."""
    X = rng.standard_normal((30, 3))
    problem = problems.least_squares(X, X @ rng.standard_normal(3))
    ints = [1, -2, 3]
    floats = np.array(ints, dtype=np.float64)
    with Client(address) as client:
        step = client.newton_step(problem, ints)
        ref = client.newton_step(problem, floats)
        np.testing.assert_array_equal(step.params, ref.params)
        h = client.compute_hessian(problem, np.array(ints, dtype=np.int32))
        np.testing.assert_array_equal(h.gradient, client.compute_hessian(problem, floats).gradient)
        run = client.start_run(
            problem, np.array([True, False, True]), stopping={"max_iterations": 2}
        )
        first = run.records()[0]
        ref_run = client.start_run(problem, [1.0, 0.0, 1.0], stopping={"max_iterations": 2})
        assert first.loss == ref_run.records()[0].loss


def test_integer_data_of_real_valued_fields_is_sent_as_the_real_numbers_it_is(address, rng):
    """problems.mse([[1, 2], [3, 4]]) and integer feature matrices were sent as int64 and
    refused by the server ("expected dtype float32 or float64, got torch.int64"), while
    integer parameters were taken. Labels stay integers. The answers equal float data's
    bit for bit."""
    X = rng.integers(-5, 6, size=(30, 3))
    labels = rng.integers(0, 3, size=30)
    w = rng.standard_normal(3)
    cases = [
        (problems.mse([[1, 2], [3, 4]]), problems.mse(np.array([[1.0, 2.0], [3.0, 4.0]])),
         np.zeros((2, 2))),
        (problems.least_squares(X, X @ [1, -1, 2]),
         problems.least_squares(X.astype(float), (X @ [1, -1, 2]).astype(float)), w),
        (problems.logistic_regression(X, labels > 0),
         problems.logistic_regression(X.astype(float), (labels > 0).astype(float)),
         np.r_[w, 0.0]),
        (problems.softmax_regression(X, labels),
         problems.softmax_regression(X.astype(float), labels), np.zeros((4, 3))),
        (problems.mlp(X, labels[:, None] > 1, layer_sizes=[3, 2, 1]),
         problems.mlp(X.astype(float), (labels[:, None] > 1).astype(float), layer_sizes=[3, 2, 1]),
         np.full(11, 0.1)),
        (problems.quadratic(np.eye(3, dtype=int) * 2, [1, 0, -1]),
         problems.quadratic(np.eye(3) * 2, np.array([1.0, 0.0, -1.0])), w),
    ]  # fmt: skip
    with Client(address) as client:
        for ints, floats, at in cases:
            step = client.newton_step(ints, at)
            ref = client.newton_step(floats, at)
            assert step.record.loss == ref.record.loss
            np.testing.assert_array_equal(step.params, ref.params)


def test_integer_data_beside_float32_data_goes_as_float32(address, rng):
    """Integer data of a real-valued field went as float64 beside float32 data, and the
    server (one float dtype per problem) refused the problem; logistic regression's integer
    or bool labels go as int64, as the server has always taken them. Reference: the same
    problem with every array cast to float32 (labels: int64) by hand, bit for bit."""
    X = rng.integers(-5, 6, size=(30, 3))
    y = rng.integers(0, 2, size=30)
    X32, y32 = X.astype(np.float32), y.astype(np.float32)
    w = rng.standard_normal(3).astype(np.float32)
    cases = [
        (problems.logistic_regression(X32, y),
         problems.logistic_regression(X32, y.astype(np.int64)), np.r_[w, 0.0].astype(np.float32)),
        (problems.logistic_regression(X32, y > 0),
         problems.logistic_regression(X32, y.astype(np.int64)), np.r_[w, 0.0].astype(np.float32)),
        (problems.least_squares(X, y32), problems.least_squares(X32, y32), w),
        (problems.quadratic(np.eye(3, dtype=np.float32) * 2, [1, 0, -1]),
         problems.quadratic(np.eye(3, dtype=np.float32) * 2, np.array([1, 0, -1], np.float32)), w),
    ]  # fmt: skip
    with Client(address) as client:
        for ints, floats, at in cases:
            step = client.newton_step(ints, at)
            ref = client.newton_step(floats, at)
            assert step.params.dtype == np.float32 and step.record.loss == ref.record.loss
            np.testing.assert_array_equal(step.params, ref.params)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: problems.logistic_regression(np.ones((3, 2)), np.ones(3), L2=1.0), "L2"),
        (lambda: problems.mse(), "target"),
        (lambda: problems.softmax_regression(np.ones((3, 2))), "labels"),
        (lambda: problems.rosenbrock(2, 3), "rosenbrock"),
        # None for data: a KeyError ('X'), or a problem the server refused for its data
        (lambda: problems.logistic_regression(None, np.ones(3)), "X"),
        (lambda: problems.logistic_regression(np.ones((3, 2)), None), "y"),
        (lambda: problems.quadratic(np.eye(2), A=np.eye(2)), "quadratic"),
    ],
)
def test_a_builder_refuses_an_argument_it_does_not_take_by_name(call, field):
    """problems.logistic_regression(X, y, L2=1) raised Python's TypeError ("unexpected
    keyword argument 'L2'"), where the SDK's refusals are InvalidArgument naming the field."""
    with pytest.raises(InvalidArgument) as err:
        call()
    assert err.value.field == field


def test_exported_data_given_as_a_list_is_refused_naming_data():
    # problems.exported(fn, p, [X]) raised AttributeError: 'list' object has no attribute 'items'
    torch = pytest.importorskip("torch")
    X = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(InvalidArgument) as err:
        problems.exported(lambda p, X: (X @ p).sum(), torch.zeros(2, dtype=torch.float64), [X])
    assert err.value.field == "data" and "mapping" in str(err.value)


def test_a_bool_mask_in_exported_data_is_refused_before_export_with_a_hint():
    """problems.exported traced the program with a bool mask, then refused the mask it had
    itself kept (the wire carries no bool): it is refused up front, saying what to send."""
    torch = pytest.importorskip("torch")
    X, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    with pytest.raises(InvalidArgument) as err:
        problems.exported(
            lambda p, X, y, m: torch.where(m, (X @ p - y) ** 2, 0.0).mean(),
            torch.zeros(2, dtype=torch.float64),
            {"X": X, "y": y, "m": y > 0},
        )
    assert err.value.field == "data.m" and "torch.where(m > 0" in str(err.value)


@pytest.mark.parametrize("error", [InvalidArgument, DeadlineExceeded, Unavailable])
def test_errors_pickle_as_they_were_and_deadline_is_a_timeout_error(error):
    """A pickled error came back prefixed twice ("INVALID_ARGUMENT: INVALID_ARGUMENT: ...",
    rebuilt from its formatted text); DeadlineExceeded was no TimeoutError (InvalidArgument
    is a ValueError), so `except TimeoutError` missed it."""
    import pickle

    err = error("the message", field="x0", expected="something")
    err.run_id = "r-1"
    err.add_note("resume it")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is error and str(back) == str(err) == f"{err.code.name}: the message"
    assert (back.message, back.field, back.expected, back.code) == (
        "the message",
        "x0",
        "something",
        err.code,
    )
    assert back.run_id == "r-1" and back.__notes__ == ["resume it"]
    assert isinstance(err, TimeoutError) == (error is DeadlineExceeded)


@pytest.mark.parametrize("content", [b"not a certificate\n", b"", "tök".encode()])
def test_a_ca_file_holding_no_certificate_is_refused_naming_it(tmp_path, content):
    """gRPC took any bytes: each call then failed UNAVAILABLE ("Failed to create security
    handshaker") after C-core's own error lines, never saying the CA file was bad."""
    bad = tmp_path / "ca.pem"
    bad.write_bytes(content)
    with pytest.raises(InvalidArgument) as err:
        Client(NOWHERE, ca_file=bad)
    assert err.value.field == "ca_file" and "expected PEM CA certificates" in str(err.value)
    assert str(bad) in str(err.value)


def test_a_ca_bundle_with_text_beside_its_certificates_is_taken(tmp_path):
    """PEM bundles carry text between blocks (openssl's "Bag Attributes", subject lines in
    UTF-8): OpenSSL and gRPC skip it, so the SDK's check must too."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-keyout", "k.pem",
                    "-out", "ca.pem", "-subj", "/CN=test CA"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)  # fmt: skip
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("subject=CN = Zürich CA\n".encode() + (tmp_path / "ca.pem").read_bytes())
    Client(NOWHERE, ca_file=bundle).close()
    with pytest.raises(InvalidArgument) as err:
        Client(NOWHERE, root_certificates=bundle.read_text())  # a str, not bytes
    assert err.value.field == "root_certificates"


def test_run_failed_pickles_with_its_notes():
    """RunFailed was rebuilt from (run_id, info) alone: notes and other attributes lost."""
    import pickle
    import types

    from hessian_client import RunFailed

    err = RunFailed("r-1", types.SimpleNamespace(message="not finite at its start"))
    err.add_note("see GetRun")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.run_id, back.__notes__) == (str(err), "r-1", ["see GetRun"])
