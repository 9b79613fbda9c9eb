"""hessian_client.minimize against SciPy: Rosenbrock in 2, 10 and 100 dimensions reaches
scipy.optimize.minimize's minimum (trust-exact, Newton-CG, trust-krylov; float64) within
1e-10 with every method, the loss never rising; SciPy's result fields and callback."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from hessian_client import (
    Client,
    InvalidArgument,
    ResourceExhausted,
    least_squares,
    minimize,
    minimize_async,
)
from hessian_service.server import ServerConfig, build_server
from scipy.optimize import LinearConstraint, rosen, rosen_der, rosen_hess, rosen_hess_prod
from scipy.optimize import minimize as scipy_minimize
from waiting import ended_within

CURVATURE = {
    "newton": {"hess": rosen_hess},
    "levenberg_marquardt": {"hess": rosen_hess},
    "saddle_free": {"hess": rosen_hess},
    "newton_cg": {"hessp": rosen_hess_prod},
    "auto": {"hessp": rosen_hess_prod},  # dense from n HVPs up to n = 64, else newton_cg
}


def start(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random start in the global minimum's basin (0 < x < 2), drawn from the test's `rng`."""
    return rng.uniform(0.2, 1.8, n)


def scipy_minimum(x0: np.ndarray, method: str) -> float:
    options = {"xtol": 1e-14} if method == "Newton-CG" else {"gtol": 1e-12}
    res = scipy_minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method=method, options=options)
    return float(res.fun)


@pytest.mark.parametrize("n", [2, 10, 100])
@pytest.mark.parametrize("method", list(CURVATURE))
def test_rosenbrock_reaches_scipys_minimum_never_rising(address, n, method, rng):
    x0 = start(rng, n)
    res = minimize(rosen, x0, jac=rosen_der, method=method, address=address, **CURVATURE[method])
    assert res.run_status == "FINISHED", res.message  # converged, or stalled at rounding
    for reference in ("trust-exact", "Newton-CG", "trust-krylov"):
        assert abs(res.fun - scipy_minimum(x0, reference)) <= 1e-10, (reference, res.fun)
    assert abs(res.fun - rosen(res.x)) <= 1e-12  # the result is the point it reports
    with Client(address) as client:
        records = client.run(res.run_id).records()
    losses = [r.loss for r in records]
    assert losses[0] == pytest.approx(rosen(x0), rel=1e-15)
    assert all(b <= a for a, b in itertools.pairwise(losses)), "the loss rose"
    assert records[-1].iteration == res.nit
    # speculative (the default): a gradient at the start and at each step's first trial, and
    # one more where a later (backtracked) trial was the accepted point
    steps = [r for r in records if r.function_evaluations]
    backtracked = sum(1 for r in steps if r.step_accepted and r.function_evaluations > 1)
    assert res.njev == 1 + len(steps) + backtracked


def test_result_fields_are_scipys(address, rng):
    x0 = start(rng, 5)
    res = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="newton", address=address)
    ref = scipy_minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="trust-exact")
    for key in ("x", "fun", "jac", "hess", "nit", "nfev", "njev", "nhev", "status", "success",
                "message"):  # fmt: skip
        assert key in ref or key == "hess", key
        assert getattr(res, key) is res[key]
    np.testing.assert_allclose(res.x, np.ones(5), atol=1e-8)
    np.testing.assert_array_equal(res.jac, rosen_der(res.x))  # the caller's own values at x
    np.testing.assert_array_equal(res.hess, rosen_hess(res.x))
    assert res.status == 0 and res.nhev == res.njev


def test_jac_true_means_fun_returns_value_and_gradient(address, rng):
    x0 = start(rng, 4)
    both = minimize(lambda x: (rosen(x), rosen_der(x)), x0, jac=True, hess=rosen_hess,
                    address=address)  # fmt: skip
    apart = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, address=address)
    np.testing.assert_array_equal(both.x, apart.x)
    assert both.nit == apart.nit


def test_callback_sees_each_record_live_and_stopiteration_ends_the_run(address, rng):
    seen = []
    with Client(address) as watcher:

        def callback(intermediate):
            seen.append((intermediate.nit, intermediate.fun, intermediate.x))
            if len(seen) == 3:
                raise StopIteration

        res = minimize(rosen, start(rng, 6), jac=rosen_der, hess=rosen_hess, callback=callback,
                       options={"gtol": 0.0}, address=address)  # fmt: skip
        info = watcher.get_run(res.run_id)
    assert res.status == 99 and not res.success
    assert info.status == "CANCELLED"
    assert [nit for nit, _, _ in seen] == [0, 1, 2]
    # as SciPy: the result is the iterate the callback stopped at, not the server's next
    assert (res.nit, res.fun) == seen[-1][:2] and np.array_equal(res.x, seen[-1][2])
    assert res.fun == rosen(res.x) and np.array_equal(res.jac, rosen_der(res.x))
    for _, fun, x in seen:
        assert fun == rosen(x)  # the point the record was taken at


def test_asyncio_variant_matches_the_sync_one(address, rng):
    x0 = start(rng, 8)
    sync = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, address=address)
    aio = asyncio.run(minimize_async(rosen, x0, jac=rosen_der, hess=rosen_hess, address=address))
    np.testing.assert_array_equal(sync.x, aio.x)
    assert (sync.nit, sync.nfev, sync.fun) == (aio.nit, aio.nfev, aio.fun)


def test_async_def_functions_are_awaited_and_answer_as_the_plain_ones(address, rng):
    """minimize_async awaits `async def` fun/jac/hess/callback on the caller's event loop
    (while another task of that loop keeps running); the run is the plain one's, bit for
    bit. Before, fun's coroutine was read as a value: INVALID_ARGUMENT "got 'coroutine'"."""
    x0 = start(rng, 6)
    plain_seen: list[tuple[int, float]] = []
    plain = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, address=address,
                     callback=lambda r: plain_seen.append((r.nit, r.fun)))  # fmt: skip
    awaited_seen: list[tuple[int, float]] = []
    ticks: list[int] = []

    async def fun(x):
        await asyncio.sleep(0)  # a remote evaluation would await here
        return rosen(x)

    async def jac(x):
        await asyncio.sleep(0)
        return rosen_der(x)

    async def callback(r):
        awaited_seen.append((r.nit, r.fun))

    async def ticker():
        while True:
            ticks.append(1)
            await asyncio.sleep(0.001)

    async def main():
        other = asyncio.ensure_future(ticker())
        try:
            return await minimize_async(fun, x0, jac=jac, hess=rosen_hess, callback=callback,
                                        address=address)  # fmt: skip
        finally:
            other.cancel()

    res = asyncio.run(main())
    np.testing.assert_array_equal(res.x, plain.x)
    assert (res.nit, res.nfev, res.njev, res.fun) == (plain.nit, plain.nfev, plain.njev, plain.fun)
    assert awaited_seen == plain_seen and ticks  # the loop ran its other task meanwhile


def test_an_async_callback_stops_the_run_with_stopiteration_as_a_plain_one_does(address, rng):
    """StopIteration raised in a coroutine leaves it as RuntimeError ("coroutine raised
    StopIteration"): the run failed instead of stopping with SciPy's status 99."""
    x0 = start(rng, 4)

    def plain(r):
        if r.nit == 2:
            raise StopIteration

    async def awaited(r):
        if r.nit == 2:
            raise StopIteration

    kw = {"jac": rosen_der, "hess": rosen_hess, "address": address}
    ref = minimize(rosen, x0, callback=plain, **kw)
    res = asyncio.run(minimize_async(rosen, x0, callback=awaited, **kw))
    assert (res.status, res.nit, res.fun) == (99, 2, ref.fun) and ref.status == 99
    np.testing.assert_array_equal(res.x, ref.x)


def test_async_functions_that_offload_to_threads_are_not_starved(address, rng):
    """The session answered on the loop's default executor, which the caller's coroutines
    need too (`asyncio.to_thread`, `run_in_executor(None, ...)`): one worker, or 12
    gathered calls on a 2-core machine's 6, and every call waited for ever."""
    from concurrent.futures import ThreadPoolExecutor

    x0 = start(rng, 3)

    async def fun(x):
        return await asyncio.get_running_loop().run_in_executor(None, rosen, x)

    async def main():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
        calls = [minimize_async(fun, x0, jac=rosen_der, hess=rosen_hess, address=address)
                 for _ in range(3)]  # fmt: skip
        return await asyncio.wait_for(asyncio.gather(*calls), 60)

    results = _in_thread(lambda: asyncio.run(main()), 90)
    ref = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, address=address)
    assert all(np.array_equal(r.x, ref.x) and r.nit == ref.nit for r in results)


def test_a_stopiteration_from_an_async_function_is_an_error_carrying_the_run(address, rng):
    """It was raised into an asyncio future, which refuses it: the call hung for ever."""

    async def fun(x):
        if fun.calls == 3:
            next(iter(()))  # an exhausted iterator, by mistake
        fun.calls += 1
        return rosen(x)

    fun.calls = 0

    def call():
        return asyncio.run(minimize_async(fun, start(rng, 3), jac=rosen_der, hess=rosen_hess,
                                          address=address))  # fmt: skip

    with pytest.raises(RuntimeError, match="StopIteration") as err:
        _in_thread(call, 60)
    assert err.value.run_id and "resume=" in err.value.__notes__[0]


def test_a_cancelled_minimize_async_calls_no_function_of_the_callers_after(address, rng):
    """The caller saw CancelledError, and its jac and hess were still called afterwards on a
    worker thread (the coroutine in flight was never cancelled)."""
    seen: list[tuple[str, bool]] = []
    cancelled = {"now": False}

    def slow(name, f):
        async def function(x, *rest):
            seen.append((name, cancelled["now"]))
            await asyncio.sleep(0.3)
            return f(x, *rest)

        return function

    async def main():
        task = asyncio.ensure_future(minimize_async(
            slow("fun", rosen), np.full(3, -1.2), jac=slow("jac", rosen_der),
            hess=slow("hess", rosen_hess), method="newton", address=address))  # fmt: skip
        await asyncio.sleep(0.45)  # inside the second function
        task.cancel()
        cancelled["now"] = True
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)  # time for any straggler to run

    _in_thread(lambda: asyncio.run(main()), 60)
    assert seen and not any(after for _, after in seen), seen


def test_a_loop_closed_under_minimize_async_lets_the_process_exit(address):
    """The session's thread waited for ever on a coroutine of the closed loop, and the
    interpreter joined it at exit (a hung process)."""
    script = (
        "import asyncio, numpy as np\n"
        "from scipy.optimize import rosen, rosen_der, rosen_hess\n"
        "from hessian_client import minimize_async\n"
        "async def fun(x):\n"
        "    await asyncio.sleep(0.3)\n"
        "    return rosen(x)\n"
        "loop = asyncio.new_event_loop()\n"
        "task = loop.create_task(minimize_async(fun, np.full(3, -1.2), jac=rosen_der,\n"
        f"    hess=rosen_hess, method='newton', address={address!r}))\n"
        "loop.run_until_complete(asyncio.sleep(1.0))\n"
        "loop.close()\n"
        "print('closed', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr


def _in_thread(call: Callable[[], object], seconds: float) -> object:
    """`call()` within `seconds` (a hung call fails the test, not the suite): its value, or
    what it raised."""
    outcome = ended_within(call, seconds, "the call")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_an_async_def_function_where_nothing_awaits_it_is_refused_naming_it(address, rng):
    async def jac(x):
        return rosen_der(x)

    with pytest.raises(InvalidArgument) as err:  # the sync call: before connecting
        minimize(rosen, start(rng, 3), jac=jac, address="127.0.0.1:1")
    assert err.value.field == "jac" and "minimize_async" in str(err.value)
    assert not err.value.from_server

    async def value(x):
        return rosen(x)

    with pytest.raises(InvalidArgument) as err:  # a plain function returning a coroutine
        asyncio.run(minimize_async(lambda x: value(x), start(rng, 3), jac=rosen_der,
                                   address=address))  # fmt: skip
    assert err.value.field == "fun" and "not an awaitable" in str(err.value)


@pytest.mark.parametrize("jac", [None, False])
def test_no_gradient_is_refused_naming_jac_before_connecting(rng, jac):
    # the caller wrote jac, not the wire's start.capabilities.gradient (which it was named)
    with pytest.raises(InvalidArgument) as err:
        minimize(rosen, start(rng, 3), jac=jac, address="127.0.0.1:1")
    assert err.value.field == "jac" and not err.value.from_server
    assert "every method needs the gradient (finite differences are not offered)" in str(err.value)


@pytest.mark.parametrize("option", ["gradient_fraction", "curvature_fraction"])
def test_row_sub_sampling_is_refused_under_the_start_fields_naming_the_callers_objective(
    address, rng, option
):
    # the caller's objective has no data rows: refused at the start, named as the option
    with pytest.raises(InvalidArgument) as err:
        minimize(
            rosen, start(rng, 3), jac=rosen_der, hessp=rosen_hess_prod, method="newton_cg",
            options={option: 0.5}, address=address,
        )  # fmt: skip
    assert err.value.field == f"options.{option}" and err.value.from_server
    assert "1 for the caller's objective (Optimize), which has no data rows" in err.value.message
    assert "remote" not in err.value.message


@pytest.mark.parametrize(
    ("derivatives", "field"),
    [({"jac": "2-point"}, "jac"), ({"jac": rosen_der, "hess": "2-point"}, "hess"),
     ({"jac": rosen_der, "hessp": "cs"}, "hessp"), ({"jac": rosen_der, "hess": object()}, "hess")],
)  # fmt: skip
def test_a_derivative_that_is_not_a_function_is_refused_not_ignored(derivatives, field):
    # SciPy's finite differences and quasi-Newton updates: they were silently dropped and
    # the run fell back to gradient descent
    with pytest.raises(InvalidArgument) as err:
        minimize(rosen, [0.0, 0.0], address="127.0.0.1:1", **derivatives)
    assert err.value.field == field and "a function of x" in err.value.message


@pytest.mark.parametrize("solve", ["minimize", "least_squares"])
def test_a_2d_x0_is_refused_naming_it_as_scipy_does(solve):
    """It was flattened silently: fun saw x of shape (4,) and res.x came back flat."""
    call = {"minimize": lambda x0: minimize(rosen, x0, jac=rosen_der, address="127.0.0.1:1"),
            "least_squares": lambda x0: least_squares(np.sin, x0, np.diag,
                                                      address="127.0.0.1:1")}[solve]  # fmt: skip
    with pytest.raises(InvalidArgument) as err:
        call(np.zeros((2, 2)))
    assert err.value.field == "x0" and err.value.message.endswith("array of parameters, got (2, 2)")


def test_one_extra_argument_need_not_be_a_tuple(address, rng):
    """SciPy wraps args=5.0 in a tuple; it raised a TypeError after starting a run."""
    x0 = start(rng, 3)
    scale = float(rng.uniform(1.0, 2.0))

    def fun(x, c):
        return c * rosen(x)

    def jac(x, c):
        return c * rosen_der(x)

    def hess(x, c):
        return c * rosen_hess(x)

    one = minimize(fun, x0, args=scale, jac=jac, hess=hess, address=address)
    tupled = minimize(fun, x0, args=(scale,), jac=jac, hess=hess, address=address)
    assert one.success and one.nit == tupled.nit
    np.testing.assert_array_equal(one.x, tupled.x)
    np.testing.assert_allclose(one.x, np.ones(3), atol=1e-6)


def test_scipy_forms_of_values_are_taken_as_scipy_takes_them(address, rng, capsys):
    """A loss as a size-1 array, a Hessian as a scipy.sparse matrix (numpy's 'only 0-d
    arrays' and 'setting an array element with a sequence' before), disp=True's report
    (dropped before): the same run as plain values, against SciPy's own answer."""
    from scipy import sparse

    x0 = start(rng, 4)
    plain = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, address=address)
    forms = minimize(lambda x: np.array([rosen(x)]), x0, jac=rosen_der,
                     hess=lambda x: sparse.csr_matrix(rosen_hess(x)),
                     options={"disp": True}, address=address)  # fmt: skip
    assert forms.success and forms.nit == plain.nit
    np.testing.assert_array_equal(forms.x, plain.x)
    reference = scipy_minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="trust-exact")
    np.testing.assert_allclose(forms.x, reference.x, atol=1e-6)
    report = capsys.readouterr().out
    assert f"Iterations: {forms.nit}" in report and f"Function evaluations: {forms.nfev}" in report


def test_a_torch_loss_that_requires_grad_is_a_value(address, rng):
    """fun returning autograd's own loss tensor (requires_grad) and its .grad: np.asarray
    refused the first ("Can't call numpy() on Tensor that requires grad")."""
    import torch

    def fun(x):
        t = torch.tensor(x, requires_grad=True)
        loss = torch.sum(100.0 * (t[1:] - t[:-1] ** 2) ** 2 + (1 - t[:-1]) ** 2)
        loss.backward()
        return loss, t.grad

    x0 = start(rng, 3)
    res = minimize(fun, x0, jac=True, hess=rosen_hess, method="newton", address=address)
    plain = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="newton", address=address)
    assert res.success and res.nit == plain.nit
    np.testing.assert_allclose(res.x, plain.x, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda a, x0: minimize(rosen, x0, jac=True, address=a), "fun"),  # f alone, not (f, g)
        (lambda a, x0: minimize(rosen, x0, jac=lambda x: "g", address=a), "jac"),
        (lambda a, x0: minimize(lambda x: np.ones(2), x0, jac=rosen_der, address=a), "fun"),
    ],
    ids=["jac-true-without-g", "jac-not-numbers", "fun-not-a-scalar"],
)
def test_a_value_that_is_not_what_scipy_takes_is_refused_naming_it(address, rng, call, field):
    with pytest.raises(InvalidArgument) as err:
        call(address, start(rng, 3))
    assert err.value.field == field and not err.value.from_server
    assert err.value.run_id  # the run it leaves INTERRUPTED, to resume


def test_unknown_method_is_refused_before_connecting():
    with pytest.raises(InvalidArgument, match="method"):
        minimize(rosen, [0.0, 0.0], jac=rosen_der, method="bfgs", address="127.0.0.1:1")


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("levenberg_marquardt", {"step_policy": "line_search"}),
        ("newton", {"method": "saddle_free"}),
        ("newton_cg", {"method": "newton"}),
    ],
)
def test_an_option_the_method_sets_is_refused_naming_it_before_connecting(method, options):
    # two values for one option: it raised a bare TypeError from the SDK's internals
    ((key, value),) = options.items()
    with pytest.raises(InvalidArgument) as err:
        minimize(
            rosen, [0.0, 0.0], jac=rosen_der, hess=rosen_hess, method=method,
            options=options, address="127.0.0.1:1",
        )  # fmt: skip
    assert err.value.field == f"options.{key}"
    assert (
        f"method {method!r} sets {key}=" in err.value.message and repr(value) in err.value.message
    )


def test_minimize_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from hessian_client import minimize, OptimizeResult\n"
        "print(OptimizeResult(x=1).x)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr


def test_speculative_trials_halve_the_round_trips_with_the_same_records(address, rng):
    x0 = start(rng, 10)
    runs = {}
    for speculative in (False, True):
        res = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="newton",
                       options={"speculative": speculative}, address=address)  # fmt: skip
        with Client(address) as client:
            records = client.run(res.run_id).records()
        steps = sum(bool(r.step_accepted) for r in records)
        fields = [(r.loss, r.gradient_norm, r.step_norm, r.step_size) for r in records]
        runs[speculative] = (res, steps, fields)
    (plain, steps, fields), (fast, fast_steps, fast_fields) = runs[False], runs[True]
    assert fast_fields == fields and fast_steps == steps
    np.testing.assert_array_equal(fast.x, plain.x)
    assert plain.round_trips >= 2 * steps  # a new point, then a loss-only trial
    backtracks = plain.round_trips - 1 - 2 * steps
    # one ask per accepted step; a backtracking step pays its backtracks and a re-ask
    assert fast.round_trips <= 1 + steps + 2 * backtracks < plain.round_trips


def test_a_numpy_bool_is_taken_for_speculative_as_numpy_numbers_are_for_the_others(address, rng):
    """options={"speculative": np.False_} was refused ("expected True or False"), while
    numpy integers and floats are taken for maxiter and tol: the same run as with False."""
    x0 = start(rng, 4)
    ref = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="newton",
                   options={"speculative": False}, address=address)  # fmt: skip
    res = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="newton",
                   options={"speculative": np.False_}, address=address)  # fmt: skip
    np.testing.assert_array_equal(res.x, ref.x)
    assert res.round_trips == ref.round_trips


@pytest.mark.parametrize("method", ["newton", "levenberg_marquardt", "saddle_free"])
def test_the_default_costs_at_most_two_round_trips_per_accepted_step(address, method):
    """Issue 16's target on Rosenbrock n = 10 (the benchmark's seeded start): speculative
    trials are the default, so a dense method's accepted full step is one round trip."""
    x0 = np.random.default_rng(10).uniform(0.2, 1.8, 10)
    res = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method=method, address=address)
    with Client(address) as client:
        accepted = sum(bool(r.step_accepted) for r in client.run(res.run_id).records())
    assert res.round_trips <= 2 * accepted, (res.round_trips, accepted)


@pytest.mark.parametrize("speculative", [False, True])
def test_a_non_finite_loss_is_a_rejected_trial_not_a_bad_reply(address, speculative):
    """Beyond |x| = 3 this function overflows: loss inf, gradient NaN. A trial there is
    rejected (Armijo backtracks); it must not fail the run for its NaN gradient."""

    def fun(x):
        if np.linalg.norm(x) > 3:
            return np.inf, np.full_like(x, np.nan)
        return 0.5 * float(x @ x), x.copy()

    res = minimize(fun, [1.0, 0.5], jac=True, method="gradient_descent", address=address,
                   options={"step_policy": "line_search", "learning_rate": 10.0,
                            "speculative": speculative})  # fmt: skip
    assert res.run_status == "FINISHED" and res.success, res.message
    np.testing.assert_allclose(res.x, 0.0, atol=1e-10)


def test_concurrent_minimize_calls_answer_bit_for_bit_as_solo(address, rng):
    starts = [start(rng, n) for n in (3, 7, 12, 20)]
    solo = [minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, address=address) for x0 in starts]
    with ThreadPoolExecutor(len(starts)) as pool:
        together = list(pool.map(
            lambda x0: minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, address=address),
            starts))  # fmt: skip
    for a, b in zip(solo, together, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        assert (a.fun, a.nit, a.nfev, a.round_trips) == (b.fun, b.nit, b.nfev, b.round_trips)


def test_a_dense_hessian_over_the_message_limit_is_refused_up_front(tmp_path):
    server = build_server(
        ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path), max_message_bytes=4 << 20)
    )
    try:
        n = 1000  # 8 MB of float64 Hessian: over a 4 MiB message
        with pytest.raises(ResourceExhausted, match=r"hess: a Hessian would take") as err:
            minimize(rosen, np.zeros(n), jac=rosen_der, hess=rosen_hess, method="newton",
                     address=server.address)  # fmt: skip
        assert err.value.field == "hess"  # the caller's argument (the wire's is capabilities)
        with pytest.raises(ResourceExhausted, match=r"method: a dense Hessian of 1000"):
            minimize(rosen, np.zeros(n), jac=rosen_der, hess=rosen_hess, method="newton",
                     options={"dense_budget_bytes": 1000}, address=server.address)  # fmt: skip
    finally:
        server.stop(grace=1.0)


def _cancelled_at_third_evaluation(address: str, name: str) -> Callable[[np.ndarray], float]:
    """A loss that has another client cancel its own run (named `name`) while it computes its
    third value, and returns only once the server has ended the run."""
    calls = itertools.count(1)

    def loss(x: np.ndarray) -> float:
        if next(calls) == 3:
            with Client(address) as other:
                (run,) = [r for r in other.list_runs() if r.name == name]
                other.cancel_run(run.run_id)
                while other.get_run(run.run_id).status == "RUNNING":
                    time.sleep(0.01)
        return float(x @ x)

    return loss


def test_a_run_the_server_ends_while_the_callers_function_runs_ends_alike_in_asyncio(address):
    """CancelRun while the caller's function computes: the sync stream returned the
    CANCELLED result, while minimize_async raised INTERNAL "Internal error from Core" (its
    write of the late reply failed on the ended call before the finished response was read)."""
    kw = {"jac": lambda x: 2 * x, "method": "gradient_descent", "address": address}
    kw["options"] = {"learning_rate": 0.01, "maxiter": 100}
    results = []
    for variant in ("sync", "async"):
        name = f"cancelled-{variant}-{time.monotonic_ns()}"
        loss = _cancelled_at_third_evaluation(address, name)
        if variant == "sync":
            results.append(minimize(loss, np.ones(3), name=name, **kw))
        else:
            results.append(asyncio.run(minimize_async(loss, np.ones(3), name=name, **kw)))
    sync, aio = results
    assert sync.run_status == aio.run_status == "CANCELLED"
    assert (sync.status, sync.nit, sync.message) == (aio.status, aio.nit, aio.message)
    np.testing.assert_array_equal(sync.x, aio.x)


def test_auto_with_a_gradient_only_takes_a_checked_step_and_reaches_the_minimum(address, rng):
    # auto chose gradient descent with the learning rate of "auto" (1) and a fixed step: on
    # sum (x - c)^2 (curvature 2 = 2 / lr) x jumped between x0 and 2c - x0 for 1000
    # iterations, and from elsewhere Rosenbrock's loss overflowed
    c = rng.normal(size=4)

    def bowl(x):
        return float(np.sum((x - c) ** 2)), 2 * (x - c)

    res = minimize(bowl, np.zeros(4), jac=True, address=address)
    assert res.success, res.message
    np.testing.assert_allclose(res.x, c, rtol=0, atol=1e-9)  # the exact minimiser
    with Client(address) as client:
        info = client.run(res.run_id).info()
    assert info.method == "gradient_descent" and "line search" in info.method_note
    x0 = start(rng, 3) - 1.5  # outside the valley
    ros = minimize(rosen, x0, jac=rosen_der, address=address, options={"maxiter": 50})
    with Client(address) as client:
        losses = [r.loss for r in client.run(ros.run_id).records()]
    assert all(np.isfinite(losses)) and all(b <= a for a, b in itertools.pairwise(losses))
    assert losses[-1] < losses[0]


def test_functions_get_their_own_copy_of_x_as_scipy_gives_it(address, rng):
    # fun(x) doing x -= c (legal under SciPy) changed the point the SDK then took the
    # gradient at and recorded: Newton failed its line search where SciPy converges
    c = rng.normal(size=3)

    def fun(x):
        x -= c
        return float(x @ x)

    res = minimize(fun, np.zeros(3), jac=lambda x: 2 * (x - c), hess=lambda x: 2 * np.eye(3),
                   address=address)  # fmt: skip
    assert res.success, res.message
    np.testing.assert_allclose(res.x, c, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (
            lambda a: minimize(
                lambda x: np.complex128(x @ x) + 1e6j, np.ones(2), jac=lambda x: 2 * x, address=a
            ),
            "fun",
        ),
        (
            lambda a: minimize(
                lambda x: float(x @ x),
                np.ones(2),
                jac=lambda x: (2 * x).astype(complex) + 1e6j,
                address=a,
            ),
            "jac",
        ),
        (
            lambda a: minimize(
                lambda x: str(float(x @ x)), np.ones(2), jac=lambda x: 2 * x, address=a
            ),
            "fun",
        ),
        (
            lambda a: minimize(lambda x: float(x @ x), ["0", "0"], jac=lambda x: 2 * x, address=a),
            "x0",
        ),
        (
            lambda a: minimize(
                lambda x: float(x @ x), [np.nan, 1.0], jac=lambda x: 2 * x, address=a
            ),
            "x0",
        ),
        (
            lambda a: minimize(
                lambda x: float(x @ x),
                np.ones(2),
                jac=lambda x: 2 * x,
                options={"maxiter": 7, "max_iterations": 5},
                address=a,
            ),
            "options.maxiter",
        ),
    ],
    ids=["complex fun", "complex jac", "string fun", "string x0", "nan x0", "two maxiters"],
)
def test_values_scipy_would_not_take_are_refused_naming_them(address, call, field):
    # a complex value lost its imaginary part with a warning, strings were parsed as
    # numbers, a NaN x0 was named start.initial_params, and of two maxiters one won in silence
    with pytest.raises(InvalidArgument) as err:
        call(address)
    assert err.value.field == field


def test_hess_is_only_reported_when_the_products_were_the_hessian_s_columns(address):
    # n = 1 and newton_cg: one product with a CG direction d was stored as the Hessian
    # (H d, here -29.04 where H = 10.58): hess is the caller's own Hessian or None
    h = lambda x: np.array([[np.cosh(x[0] - 1) + 12 * x[0] ** 2]])  # noqa: E731

    def stop_at_third(r):
        if r.nit >= 3:
            raise StopIteration

    res = minimize(lambda x: float(np.cosh(x[0] - 1) + x[0] ** 4), np.array([3.0]),
                   jac=lambda x: np.array([np.sinh(x[0] - 1) + 4 * x[0] ** 3]),
                   hessp=lambda x, p: h(x) @ p, method="newton_cg", callback=stop_at_third,
                   address=address)  # fmt: skip
    assert res.hess is None or np.allclose(res.hess, h(res.x), rtol=1e-12)
    # products with every unit vector are the Hessian: reported (n = 3, Rosenbrock)
    full = minimize(rosen, np.zeros(3), jac=rosen_der, hessp=rosen_hess_prod,
                    method="newton", address=address)  # fmt: skip
    np.testing.assert_allclose(full.hess, rosen_hess(full.x), rtol=1e-12)


def test_no_derivative_is_asked_where_the_loss_is_not_finite(address):
    # x - log x on x > 0, inf elsewhere: the gradient is undefined there and raises; the
    # first (speculative) trial of Newton from 3 lands at x < 0, which the server rejects
    # without reading anything but the loss
    asked_outside = []

    def grad(x):
        if x[0] <= 0:
            asked_outside.append(x[0])
            raise ValueError("undefined")
        return np.array([1 - 1 / x[0]])

    res = minimize(lambda x: np.inf if x[0] <= 0 else float(x[0] - np.log(x[0])),
                   np.array([3.0]), jac=grad, hess=lambda x: np.array([[1 / x[0] ** 2]]),
                   method="newton", address=address)  # fmt: skip
    assert res.success and not asked_outside
    np.testing.assert_allclose(res.x, [1.0], atol=1e-8)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"options": {"maxiter": 5.0}}, "options.maxiter"),
        ({"options": {"max_iterations": 5.0}}, "options.max_iterations"),
        ({"tol": "1e-3"}, "tol"),
        ({"tol": -1.0}, "tol"),  # refused by the server: it said start.stopping...
        ({"options": {"gtol": -1.0}}, "options.gtol"),
    ],
)
def test_a_bad_criterion_is_refused_under_the_name_the_caller_gave_it(address, kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        minimize(rosen, np.zeros(2), jac=rosen_der, hess=rosen_hess, address=address, **kwargs)
    assert err.value.field == field and str(err.value).count(field) >= 1


def test_the_sdk_s_default_iteration_cap_over_the_server_s_says_what_to_pass(tmp_path):
    server = build_server(
        ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path), max_iterations=500)
    )
    try:
        with pytest.raises(ResourceExhausted) as err:
            minimize(rosen, np.zeros(2), jac=rosen_der, hess=rosen_hess,
                     address=server.address)  # fmt: skip
        assert err.value.field == "options.maxiter" and "default of 1000" in str(err.value)
        with pytest.raises(ResourceExhausted) as err:
            least_squares(lambda x: x - 1, np.zeros(2), jac=lambda x: np.eye(2),
                          address=server.address)  # fmt: skip
        assert err.value.field == "max_iterations"
        res = minimize(rosen, np.zeros(2), jac=rosen_der, hess=rosen_hess,
                       options={"maxiter": 500}, address=server.address)  # fmt: skip
        np.testing.assert_allclose(res.x, np.ones(2), atol=1e-8)
    finally:
        server.stop(grace=1.0)


def test_an_x0_over_the_server_s_lower_message_limit_is_named_x0(tmp_path):
    # the SDK's 64 MiB let it go; the server's 100 kB refused it: "SERVER: Received message
    # larger than max (160032 vs. 100000)" with no field
    server = build_server(
        ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path), max_message_bytes=100_000)
    )
    try:
        for solve in (
            lambda: minimize(lambda x: float(x @ x), np.zeros(20_000), jac=lambda x: 2 * x,
                             address=server.address),
            lambda: least_squares(lambda x: x, np.zeros(20_000), lambda x: np.eye(1),
                                  address=server.address),
            lambda: asyncio.run(minimize_async(lambda x: float(x @ x), np.zeros(20_000),
                                               jac=lambda x: 2 * x, address=server.address)),
        ):  # fmt: skip
            with pytest.raises(ResourceExhausted) as err:
                solve()
            assert err.value.field == "x0" and "100,000-byte message limit" in str(err.value)
    finally:
        server.stop(grace=1.0)


def test_a_run_whose_own_messages_could_not_be_sent_is_refused_at_its_start(tmp_path):
    """Under a lowered --max-message-bytes, a start that fitted was accepted though the run
    could never send its asks (the point with a CG vector: INTERRUPTED at once, and every
    resume the same) or its end (the final parameters: FINISHED, its x never delivered).
    Refused at the start, named x0; a smaller x0 runs to its end."""
    server = build_server(
        ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path), max_message_bytes=100_000)
    )
    try:
        for n, kwargs in (
            (6_000, {"method": "newton_cg", "hessp": lambda x, p: 2 * p}),
            (12_000, {"method": "gradient_descent"}),
        ):
            with pytest.raises(ResourceExhausted) as err:
                minimize(lambda x: float(x @ x), np.ones(n), jac=lambda x: 2 * x,
                         address=server.address, **kwargs)  # fmt: skip
            assert err.value.field == "x0" and f"requests for {n} parameters" in str(err.value)
        with Client(server.address) as client:
            assert not list(client.list_runs())  # no run was made
        res = minimize(lambda x: float(x @ x), np.ones(5_000), jac=lambda x: 2 * x,
                       hessp=lambda x, p: 2 * p, method="newton_cg",
                       address=server.address)  # fmt: skip
        assert res.success and np.array_equal(res.x, np.zeros(5_000))
    finally:
        server.stop(grace=1.0)


def test_a_renamed_refusal_keeps_its_status_code_and_notes():
    from hessian_client import HessianError
    from hessian_client.minimize import _Session

    session = _Session(rosen, np.zeros(2), (), rosen_der, rosen_hess, None, None, 1e-3, None,
                       None, "")  # fmt: skip
    field = "start.stopping.gradient_tolerance"
    error = HessianError(f"{field}: out of range", grpc.StatusCode.OUT_OF_RANGE, field=field)
    error.add_note("a note")
    renamed = session.renamed(error)
    assert renamed.field == "tol" and renamed.code == grpc.StatusCode.OUT_OF_RANGE
    assert renamed.message.startswith("tol: ") and renamed.__notes__ == ["a note"]


def test_scipys_positional_order_and_method_names_in_any_case(address, rng):
    """minimize(fun, x0, args, method, jac, hess) as SciPy's: method, jac and hess were
    keyword-only (a TypeError); "NEWTON" was refused though the Client takes it."""
    x0 = start(rng, 4)
    keywords = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="newton",
                        address=address)  # fmt: skip
    positional = minimize(rosen, x0, (), "NEWTON", rosen_der, rosen_hess, address=address)
    np.testing.assert_array_equal(positional.x, keywords.x)
    assert (positional.nit, positional.fun) == (keywords.nit, keywords.fun)


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        ({"method": "Newton-CG"}, "method", "SciPy's 'Newton-CG' is nearest to 'newton_cg'"),
        ({"bounds": [(0, 1), (None, None)]}, "bounds", "bounds are not served"),
        ({"bounds": [(-np.inf, -np.inf), (np.inf, np.inf)]}, "bounds", "bounds are not served"),
        ({"constraints": [{"type": "eq", "fun": sum}]}, "constraints", "not served"),
        ({"constraints": {"type": "eq", "fun": sum}}, "constraints", "not served"),
        ({"constraints": LinearConstraint(np.eye(2), -1, 1)}, "constraints", "not served"),
        ({"timeout": 3}, "timeout", "an argument this function serves"),
        # a key of options given as an argument (README's speculative=False) says where it goes
        ({"speculative": False}, "speculative", "inside options (options={'speculative'"),
        ({"maxiter": 5}, "maxiter", "inside options (options={'maxiter'"),
    ],
)
def test_what_minimize_does_not_serve_is_refused_naming_it_before_connecting(
    rng, kwargs, field, expected
):
    """bounds=, constraints= and unknown keywords were Python TypeErrors (least_squares
    refused its own by name), SciPy's method names a bare "one of [...]"."""
    for call in (minimize, lambda *a, **k: asyncio.run(minimize_async(*a, **k))):
        with pytest.raises(InvalidArgument) as err:
            call(rosen, start(rng, 2), jac=rosen_der, address="127.0.0.1:1", **kwargs)
        assert err.value.field == field and expected in str(err.value)
        assert not err.value.from_server


@pytest.mark.parametrize(
    "bounds", [None, [(None, None)] * 2, [(-np.inf, np.inf)] * 2, "scipy default"]
)
def test_no_bound_in_scipys_forms_is_taken(address, rng, bounds):
    if bounds == "scipy default":
        from scipy.optimize import Bounds

        bounds = Bounds()
    res = minimize(rosen, start(rng, 2), jac=rosen_der, hess=rosen_hess, bounds=bounds,
                   constraints=(), address=address)  # fmt: skip
    assert res.success


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda a: minimize(rosen, np.zeros(2), jac=rosen_der, address=a,
                            options={"learning_rate": -1.0}), "options.learning_rate"),
        (lambda a: minimize(rosen, np.zeros(2), jac=rosen_der, address=a, name="x" * 300),
         "name"),
        (lambda a: minimize(rosen, np.zeros(2), jac=rosen_der, address=a, resume="r-none"),
         "resume"),
        (lambda a: minimize(rosen, np.zeros(2), jac=rosen_der, address=a,
                            method="levenberg_marquardt"), "hess"),
        (lambda a: least_squares(lambda x: x - 1, np.zeros(80), lambda x: np.eye(80),
                                 address=a), "method"),
    ],
)  # fmt: skip
def test_the_servers_refusals_name_the_callers_argument(address, call, field):
    """They named the wire's fields: start.options.learning_rate, start.name,
    resume_run_id, start.capabilities (for a missing hess, or least_squares' default
    method past n = 64)."""
    from hessian_client import HessianError

    with pytest.raises(HessianError) as err:
        call(address)
    assert err.value.field == field and err.value.from_server
    assert f"{field}: " in str(err.value)


def test_limit_refusals_name_the_callers_argument(tmp_path):
    """x0 past --max-params was named start.initial_params.shape, a dense method past its
    budget start.options, least_squares' options={"maxiter": ...} past the server's limit
    max_iterations (an argument the caller did not write)."""
    from hessian_client import HessianError

    server = build_server(ServerConfig(
        address="127.0.0.1:0", data_dir=str(tmp_path), max_params=10, max_iterations=50,
        dense_budget_bytes=400))  # fmt: skip
    a = server.address
    eye = lambda x: np.eye(2)  # noqa: E731
    calls = [
        (lambda: minimize(rosen, np.zeros(11), jac=rosen_der, address=a), "x0"),
        (lambda: minimize(rosen, np.zeros(8), jac=rosen_der, hess=rosen_hess, method="newton",
                          address=a), "method"),
        (lambda: least_squares(lambda x: x, np.zeros(2), eye, address=a,
                               options={"maxiter": 100}), "options.maxiter"),
        (lambda: least_squares(lambda x: x, np.zeros(2), eye, address=a, max_iterations=100),
         "max_iterations"),
    ]  # fmt: skip
    try:
        for call, field in calls:
            with pytest.raises(HessianError) as err:
                call()
            assert err.value.field == field and err.value.from_server, err.value
    finally:
        server.stop(grace=1.0)


def test_a_plain_callback_returning_a_coroutine_is_refused_not_skipped(address, rng):
    """callback=lambda r: acb(r): the coroutine was dropped unrun (a never-awaited warning)
    and the run went on as if the callback had looked."""

    async def acb(r):
        return None

    for call in (minimize, lambda *a, **k: asyncio.run(minimize_async(*a, **k))):
        with pytest.raises(InvalidArgument) as err:
            call(rosen, start(rng, 3), jac=rosen_der, hess=rosen_hess, address=address,
                 callback=lambda r: acb(r))  # fmt: skip
        assert err.value.field == "callback" and err.value.run_id
