"""hessian_client.least_squares against scipy.optimize.least_squares (float64, fresh random
data each run): a curve fit and Rosenbrock written as residuals reach SciPy's final cost
within 1e-10 with Levenberg-Marquardt, Gauss-Newton and Gauss-Newton-CG on the server,
which sees only 0.5 ||r||^2, J^T r and J^T J v; SciPy's result fields; bad input named."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from hessian_client import (
    Client,
    InvalidArgument,
    least_squares,
    least_squares_async,
    minimize,
)
from scipy.optimize import least_squares as scipy_least_squares
from scipy.optimize import rosen, rosen_der, rosen_hess
from scipy.sparse.linalg import aslinearoperator

METHODS = ("levenberg_marquardt", "gauss_newton", "gauss_newton_cg")
TIGHT = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15}


class CurveFit:
    """y = a exp(-b t) + c + noise, with parameters and noise drawn from `rng`."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.t = np.linspace(0.0, 4.0, 120)
        a, b, c = rng.uniform(1.0, 3.0), rng.uniform(0.5, 2.0), rng.uniform(-1.0, 1.0)
        self.y = a * np.exp(-b * self.t) + c + 0.05 * rng.standard_normal(self.t.size)
        self.x0 = np.array([1.0, 1.0, 0.0])

    def residuals(self, p: np.ndarray) -> np.ndarray:
        return p[0] * np.exp(-p[1] * self.t) + p[2] - self.y

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        e = np.exp(-p[1] * self.t)
        return np.stack([e, -p[0] * self.t * e, np.ones_like(self.t)], axis=1)


def rosen_residuals(x: np.ndarray) -> np.ndarray:
    """Rosenbrock as residuals: 0.5 ||r||^2 = rosen(x) / 2 (SciPy's own tutorial form)."""
    return np.concatenate([10.0 * (x[1:] - x[:-1] ** 2), 1.0 - x[:-1]])


def rosen_jacobian(x: np.ndarray) -> np.ndarray:
    n = x.size
    j = np.zeros((2 * (n - 1), n))
    i = np.arange(n - 1)
    j[i, i], j[i, i + 1] = -20.0 * x[:-1], 10.0
    j[n - 1 + i, i] = -1.0
    return j


@pytest.mark.parametrize("method", METHODS)
def test_curve_fit_reaches_scipys_cost(address, method, rng):
    fit = CurveFit(rng)
    ref = scipy_least_squares(fit.residuals, fit.x0, jac=fit.jacobian, method="trf", **TIGHT)
    res = least_squares(fit.residuals, fit.x0, fit.jacobian, method=method, gtol=1e-10,
                        max_iterations=500, address=address)  # fmt: skip
    assert res.run_status == "FINISHED", res.message
    assert abs(res.cost - ref.cost) <= 1e-10, (res.cost, ref.cost)
    np.testing.assert_allclose(res.x, ref.x, atol=1e-6)
    assert res.cost == 0.5 * float(fit.residuals(res.x) @ fit.residuals(res.x))


@pytest.mark.parametrize("method", ["levenberg_marquardt", "gauss_newton_cg"])
def test_a_fit_in_large_units_reaches_scipys_cost(address, rng, method):
    """Data in micro-units (a ~ 1e6, b ~ 1): J's columns differ by 1e6. Levenberg-Marquardt's
    lambda I damping (set by the stiff column) held a to steps of 1e-3 until the parameter
    test stopped the run "stalled" at 3000x SciPy's cost, reported as success; Marquardt's
    scaling (lambda diag J^T J, MINPACK's and Ceres') damps each parameter by its own
    curvature. gauss_newton_cg stalled the same way after CG steps that met a loose forcing
    tolerance along the stiff column; a stall after such a partial solve is now judged after
    a solve to cg_tolerance."""
    fit = CurveFit(rng)
    a, b, c = rng.uniform(2.0, 3.0), rng.uniform(1.0, 2.0), rng.uniform(0.25, 1.0)
    fit.y = 1e6 * (a * np.exp(-b * fit.t) + c + 0.01 * rng.standard_normal(fit.t.size))
    x0 = np.array([1e6, 1.0, 0.0])
    ref = scipy_least_squares(fit.residuals, x0, jac=fit.jacobian, method="lm")
    assert ref.success
    res = least_squares(fit.residuals, x0, fit.jacobian, method=method,
                        max_iterations=500, address=address)  # fmt: skip
    assert res.run_status == "FINISHED", res.message
    assert abs(res.cost - ref.cost) <= 1e-10 * ref.cost, (res.cost, ref.cost)
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-6)


def test_args_as_a_list_are_unpacked_as_scipys_least_squares_does(address, rng):
    """SciPy's least_squares calls fun(x, *args) for a list too (minimize wraps a non-tuple
    in a tuple: one argument); a list was passed whole here."""
    fit = CurveFit(rng)

    def residuals(p, t, y):
        return p[0] * np.exp(-p[1] * t) + p[2] - y

    def jacobian(p, t, y):
        e = np.exp(-p[1] * t)
        return np.stack([e, -p[0] * t * e, np.ones_like(t)], axis=1)

    listed = least_squares(residuals, fit.x0, jacobian, args=[fit.t, fit.y], address=address)
    plain = least_squares(fit.residuals, fit.x0, fit.jacobian, address=address)
    ref = scipy_least_squares(residuals, fit.x0, jacobian, args=[fit.t, fit.y], method="lm")
    np.testing.assert_array_equal(listed.x, plain.x)
    assert abs(listed.cost - ref.cost) <= 1e-10 * ref.cost


@pytest.mark.parametrize("method", ["levenberg_marquardt", "gauss_newton_cg"])
def test_a_sparse_jacobian_gives_the_dense_jacobians_run(address, rng, method):
    """scipy.sparse J, which SciPy takes (numpy's 'setting an array element with a
    sequence' before): used as an operator, J @ v and J.T @ u."""
    from scipy import sparse

    fit = CurveFit(rng)
    dense = least_squares(fit.residuals, fit.x0, fit.jacobian, method=method, address=address)
    jac = lambda p: sparse.csr_matrix(fit.jacobian(p))  # noqa: E731
    res = least_squares(fit.residuals, fit.x0, jac, method=method, address=address)
    assert res.success and res.nit == dense.nit
    np.testing.assert_allclose(res.x, dense.x, rtol=1e-12)


@pytest.mark.parametrize("n", [2, 10])
@pytest.mark.parametrize("method", METHODS)
def test_rosenbrock_as_residuals_reaches_scipys_cost(address, n, method, rng):
    x0 = rng.uniform(0.2, 1.8, n)  # in the global minimum's basin
    ref = scipy_least_squares(rosen_residuals, x0, jac=rosen_jacobian, **TIGHT)
    res = least_squares(rosen_residuals, x0, rosen_jacobian, method=method, xtol=1e-15,
                        gtol=1e-10, max_iterations=1000, address=address)  # fmt: skip
    assert res.run_status == "FINISHED", res.message
    assert abs(res.cost - ref.cost) <= 1e-10, (res.cost, ref.cost)
    assert abs(res.cost - 0.5 * rosen(res.x)) <= 1e-12  # the cost is the point it reports
    assert res.success, res.message


@pytest.mark.parametrize(("n", "chosen"), [(5, "newton"), (80, "gauss_newton_cg")])
def test_auto_picks_dense_gauss_newton_up_to_64_parameters_then_cg(address, n, chosen, rng):
    x0 = rng.uniform(0.2, 1.8, n)
    ref = scipy_least_squares(rosen_residuals, x0, jac=rosen_jacobian, **TIGHT)
    res = least_squares(rosen_residuals, x0, rosen_jacobian, method="auto", gtol=1e-10,
                        xtol=1e-15, address=address)  # fmt: skip
    assert abs(res.cost - ref.cost) <= 1e-10, (res.cost, ref.cost)
    with Client(address) as client:
        info = client.get_run(res.run_id)
    assert info.method == chosen and "Gauss-Newton products" in info.method_note


def test_result_fields_are_scipys_and_the_callers_values(address, rng):
    fit = CurveFit(rng)
    ref = scipy_least_squares(fit.residuals, fit.x0, jac=fit.jacobian)
    res = least_squares(fit.residuals, fit.x0, fit.jacobian, gtol=1e-10, address=address)
    for key in ref:
        assert key in res, key
    np.testing.assert_array_equal(res.fun, fit.residuals(res.x))
    np.testing.assert_array_equal(res.jac, fit.jacobian(res.x))
    np.testing.assert_array_equal(res.grad, fit.jacobian(res.x).T @ fit.residuals(res.x))
    assert res.optimality == np.max(np.abs(res.grad))
    # r and J are computed once per point: the residuals at least once per ask of a new point
    assert res.njev <= res.nfev <= res.round_trips


def test_a_jacobian_operator_gives_the_dense_jacobians_run(address, rng):
    """jac may return an operator (matvec / rmatvec), e.g. SciPy's LinearOperator."""
    fit = CurveFit(rng)
    dense = least_squares(fit.residuals, fit.x0, fit.jacobian, address=address)
    operator = least_squares(
        fit.residuals, fit.x0, lambda p: aslinearoperator(fit.jacobian(p)), address=address
    )
    assert abs(operator.cost - dense.cost) <= 1e-12
    np.testing.assert_allclose(operator.x, dense.x, rtol=1e-9)


def test_async_variant_reaches_the_same_cost(address, rng):
    fit = CurveFit(rng)
    ref = scipy_least_squares(fit.residuals, fit.x0, jac=fit.jacobian, **TIGHT)
    res = asyncio.run(least_squares_async(fit.residuals, fit.x0, fit.jacobian, gtol=1e-10,
                                          address=address))  # fmt: skip
    assert abs(res.cost - ref.cost) <= 1e-10


def test_async_def_residuals_and_jacobian_are_awaited(address, rng):
    fit = CurveFit(rng)
    plain = least_squares(fit.residuals, fit.x0, fit.jacobian, gtol=1e-10, address=address)

    async def residuals(x):
        await asyncio.sleep(0)
        return fit.residuals(x)

    async def jacobian(x):
        return fit.jacobian(x)

    res = asyncio.run(least_squares_async(residuals, fit.x0, jacobian, gtol=1e-10,
                                          address=address))  # fmt: skip
    np.testing.assert_array_equal(res.x, plain.x)
    assert (res.cost, res.nfev, res.njev) == (plain.cost, plain.nfev, plain.njev)


def test_disp_prints_the_termination_report(address, rng, capsys):
    """options={"disp": True} was taken and ignored by least_squares (minimize's printed)."""
    fit = CurveFit(rng)
    res = least_squares(fit.residuals, fit.x0, fit.jacobian, gtol=1e-10, address=address,
                        options={"disp": True})  # fmt: skip
    out = capsys.readouterr().out
    assert res.message in out and f"Function evaluations {res.nfev}," in out
    assert f"final cost {res.cost:.4e}" in out
    least_squares(fit.residuals, fit.x0, fit.jacobian, gtol=1e-10, address=address)
    assert capsys.readouterr().out == ""


def _growing_residuals():
    """(fun, jac) whose residual count grows by one at each new point (scipy refuses it)."""
    points: list[bytes] = []

    def count(x: np.ndarray) -> int:
        if x.tobytes() not in points:
            points.append(x.tobytes())
        return 1 + points.index(x.tobytes())

    def fun(x: np.ndarray) -> np.ndarray:
        return np.full(count(x), x.sum())

    def jac(x: np.ndarray) -> np.ndarray:
        return np.ones((count(x), x.size))

    return fun, jac


def _least_squares_growing(address: str) -> object:
    fun, jac = _growing_residuals()
    return least_squares(fun, np.ones(2), jac, address=address)


class _Operator:
    """A Jacobian given as an operator (matvec / rmatvec / shape), like scipy's."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix, self.shape = matrix, matrix.shape

    def matvec(self, v: np.ndarray) -> np.ndarray:
        return self.matrix @ v

    def rmatvec(self, u: np.ndarray) -> np.ndarray:
        return self.matrix.T @ u


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda a: least_squares(rosen_residuals, np.ones(2), "2-point", address=a), "jac"),
        # SciPy's default (jac="2-point") left out: Python's "missing 1 required positional
        # argument: 'jac'" (a TypeError, not the InvalidArgument minimize gives)
        (lambda a: least_squares(rosen_residuals, np.ones(2), address=a), "jac: expected"),
        (
            lambda a: least_squares(
                rosen_residuals, np.ones(2), rosen_jacobian, loss="huber", address=a
            ),
            "loss",
        ),
        (
            lambda a: least_squares(
                rosen_residuals, np.ones(2), rosen_jacobian, method="trf", address=a
            ),
            "method",
        ),
        (  # a Jacobian operator of the wrong shape (scipy's LinearOperator would not say so)
            lambda a: least_squares(
                rosen_residuals,
                np.ones(2),
                lambda x: _Operator(np.ones((10, 3))),
                address=a,
            ),
            "jac",
        ),
        (  # the residual count may not change from one point to the next
            _least_squares_growing,
            "fun",
        ),
        (  # dense J^T J is assembled from n products only up to n = 64
            lambda a: least_squares(rosen_residuals, np.ones(65), rosen_jacobian, address=a),
            "method: expected gauss_newton with n <= 64 (or method gauss_newton_cg) for method "
            "levenberg_marquardt, got gauss_newton with n = 65",
        ),
        (  # an option the method already sets (it raised a bare TypeError)
            lambda a: least_squares(
                rosen_residuals,
                np.ones(2),
                rosen_jacobian,
                options={"curvature": "hessian"},
                address=a,
            ),
            "options.curvature",
        ),
        (
            lambda a: least_squares(
                rosen_residuals,
                np.ones(2),
                rosen_jacobian,
                method="lm",
                options={"step_policy": "fixed"},
                address=a,
            ),
            "options.step_policy",
        ),
        (  # Newton without hess: what the caller gave, not an n that meets the condition
            lambda a: minimize(rosen, np.ones(3), jac=rosen_der, method="newton", address=a),
            "hess: expected hessian, or hvp with n <= 64, for method newton, got the gradient "
            "alone with n = 3",
        ),
        (  # minimize() offers no Gauss-Newton products
            lambda a: minimize(
                rosen,
                np.ones(3),
                jac=True,
                method="auto",
                options={"curvature": "gauss_newton"},
                address=a,
            ),
            "options.curvature: expected true for",
        ),
        (
            lambda a: minimize(
                rosen,
                np.ones(3),
                jac=rosen_der,
                hess=rosen_hess,
                method="levenberg_marquardt",
                options={"curvature": "gauss_newton"},
                address=a,
            ),
            "options.curvature: expected true for",
        ),
    ],
)
def test_bad_input_is_named(address, call, field):
    with pytest.raises(InvalidArgument) as info:
        call(address)
    assert field in str(info.value)


@pytest.mark.parametrize("bounds", [(0.0, np.inf), ([-1, -1], [1, 1]), "wide"])
def test_bounds_are_refused_naming_them_not_a_type_error(bounds):
    """bounds were not a parameter at all: Python's TypeError, though the README lists them
    with the refused robust losses."""
    with pytest.raises(InvalidArgument) as err:
        least_squares(_line_residuals, np.zeros(2), _line_jacobian, bounds=bounds,
                      address="127.0.0.1:1")  # fmt: skip
    assert err.value.field == "bounds" and not err.value.from_server


@pytest.mark.parametrize("bounds", [None, (-np.inf, np.inf), ([-np.inf] * 2, [np.inf, np.inf])])
def test_scipys_default_bounds_are_no_bounds(address, bounds):
    res = least_squares(_line_residuals, np.zeros(2), _line_jacobian, bounds=bounds,
                        address=address)  # fmt: skip
    np.testing.assert_allclose(res.x, np.linalg.lstsq(_T_X, _T_Y, rcond=None)[0], rtol=1e-9)


_T = np.linspace(0.0, 1.0, 9)
_T_X = np.column_stack([_T, np.ones_like(_T)])
_T_Y = 2.0 * _T - 1.0 + 0.1 * np.sin(7 * _T)


def _line_residuals(x):
    return _T_X @ x - _T_Y


def _line_jacobian(x):
    return _T_X


def test_scipys_no_bounds_object_is_taken_and_unserved_arguments_are_named(address, rng):
    from scipy.optimize import Bounds

    fit = CurveFit(rng)
    free = least_squares(fit.residuals, fit.x0, fit.jacobian, bounds=Bounds(-np.inf, np.inf),
                         address=address)  # fmt: skip
    plain = least_squares(fit.residuals, fit.x0, fit.jacobian, address=address)
    np.testing.assert_array_equal(free.x, plain.x)
    for name, value in (("max_nfev", 50), ("x_scale", "jac"), ("verbose", 2)):
        with pytest.raises(InvalidArgument) as err:  # was Python's TypeError
            least_squares(fit.residuals, fit.x0, fit.jacobian, address=address, **{name: value})
        assert err.value.field == name
    # one setting given twice (an argument and an option, in either name) was resolved in
    # silence, the argument losing
    for options in ({"gtol": 1e-12}, {"gradient_tolerance": 1e-12}):
        with pytest.raises(InvalidArgument, match="an argument sets it"):
            least_squares(fit.residuals, fit.x0, fit.jacobian, gtol=1e-3, options=options,
                          address=address)  # fmt: skip


def test_residuals_and_jacobian_get_their_own_copy_of_x(address, rng):
    # SciPy passes a copy: a residual function that works in x's memory moved the point
    fit = CurveFit(rng)

    def residuals(p):
        p *= 1.0  # in place, harmless on a copy
        p[2] += 0.0
        out = fit.residuals(p)
        p[:] = 0.0  # scribbles over its argument
        return out

    def jacobian(p):
        out = fit.jacobian(p)
        p[:] = 0.0
        return out

    scribbled = least_squares(residuals, fit.x0, jacobian, address=address)
    clean = least_squares(fit.residuals, fit.x0, fit.jacobian, address=address)
    np.testing.assert_array_equal(scribbled.x, clean.x)


def test_a_fit_no_step_can_lower_at_machine_precision_is_a_success_as_scipy_says(address):
    # every test disabled (0): LM ends when no damped step can lower the cost at this
    # precision, at the least-squares optimum; it was status -1, success False
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    a = np.hstack([x, np.ones((x.shape[0], 1))])
    res = least_squares(lambda w: a @ w - y, np.zeros(a.shape[1]), lambda w: a,
                        gtol=0, ftol=0, xtol=0, max_iterations=200, address=address)  # fmt: skip
    want = np.linalg.lstsq(a, y, rcond=None)[0]  # float64 reference
    assert res.status == 2 and res.success, res.message
    np.testing.assert_allclose(res.x, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_no_jacobian_is_asked_where_the_residuals_are_not_finite(address):
    # r = atan(x - 1): Gauss-Newton's full step from 2.4 overshoots to -0.41, where the
    # residuals are inf; the server rejects that trial reading the loss alone, and the
    # Jacobian was computed there all the same
    asked_outside = []

    def residuals(x):
        return np.array([np.inf]) if x[0] < -0.2 else np.array([np.arctan(x[0] - 1.0)])

    def jacobian(x):
        if x[0] < -0.2:
            asked_outside.append(x[0])
        return np.array([[1.0 / (1.0 + (x[0] - 1.0) ** 2)]])

    res = least_squares(residuals, np.array([2.4]), jacobian, method="gauss_newton",
                        address=address)  # fmt: skip
    np.testing.assert_allclose(res.x, [1.0], atol=1e-8)
    assert not asked_outside


def test_residuals_not_finite_at_the_start_end_the_run_without_asking_jac(address):
    """The result asked jac at the final point whatever it was: a run that failed at a
    start with NaN residuals called jac there after the stream (README: where fun is not
    finite, jac is not called) and raised the caller's error without the run id."""

    def jac(x):
        raise AssertionError("jac asked where the residuals are NaN")

    res = least_squares(lambda x: np.array([np.nan, x[0] - 1]), [0.0, 0.0], jac,
                        address=address)  # fmt: skip
    assert res.run_status == "FAILED" and not res.success and res.njev == 0
    assert res.jac is None and res.grad is None and np.isnan(res.optimality)
    assert np.isnan(res.cost) and np.array_equal(res.x, [0.0, 0.0])


def test_async_residuals_the_result_evaluates_again_do_not_block_the_loop(address):
    """The result asks r and J at the final point, from its cache of the last few points
    or anew: with async def functions that happened on the event loop, which then waited on
    itself for ever (a run of 8 iterations of a rough residual, each step rejected)."""
    t = np.linspace(0, 1, 20)

    def residuals(x):  # a rough surface: steps are rejected, the cache moves past x
        return x[0] * t + x[1] - (2 * t + 1) + 1e-7 * np.sin(1e8 * x[0]) * np.cos(1e8 * x[1])

    async def aresiduals(x):
        await asyncio.sleep(0)
        return residuals(x)

    def jacobian(x):
        return np.stack([t, np.ones_like(t)], axis=1)

    tight = {"gtol": 0, "ftol": 0, "xtol": 0, "max_iterations": 8, "address": address}
    plain = least_squares(residuals, np.zeros(2), jacobian, **tight)
    outcome: list = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            asyncio.run(least_squares_async(aresiduals, np.zeros(2), jacobian, **tight))
        ),
        daemon=True,
    )
    worker.start()
    worker.join(60)
    assert outcome, "least_squares_async never returned (its event loop blocked)"
    np.testing.assert_array_equal(outcome[0].x, plain.x)
    assert outcome[0].cost == plain.cost
