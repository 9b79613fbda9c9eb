"""The engine's cancel token: deadlines, reasons, per-request scope, and where work stops.

`CancelAt(k)` cancels itself at its k-th check, so each test sees exactly which check
stopped the work and that no further check (no further product, row chunk or iteration)
ran after it: a deterministic stand-in for a deadline passing mid-computation.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hessian_service.engine import (
    Cancelled,
    CancelToken,
    MethodOptions,
    Run,
    SpectrumOptions,
    StopCriteria,
    StopReason,
    analyze_curvature,
    make_objective,
    take_step,
)
from hessian_service.engine import cancel as engine_cancel
from hessian_service.engine.analysis.curvature_summary import dense_curvature
from hessian_service.engine.curvature.autograd import newton_system
from problems import random_params, random_problem


class CancelAt(CancelToken):
    """A token that cancels itself at its k-th check and records every check's place."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.places: list[str] = []

    def check(self, where: str = "") -> None:
        self.places.append(where)
        if len(self.places) == self.k:
            self.cancel()
        super().check(where)


def test_a_past_deadline_cancels_with_reason_deadline():
    token = CancelToken.after(0.0)
    assert token.cancelled and token.reason == "deadline"
    with pytest.raises(Cancelled) as err:
        token.check("somewhere")
    assert err.value.reason == "deadline" and "somewhere" in str(err.value)
    later = CancelToken.after(3600.0)
    assert not later.cancelled and later.reason is None
    later.check()  # does not raise
    assert not CancelToken.after(None).cancelled


def test_cancel_from_another_thread_keeps_the_first_reason():
    token = CancelToken()
    t = threading.Thread(target=token.cancel)
    t.start()
    t.join()
    token.cancel("deadline")
    assert token.reason == "cancelled"
    with pytest.raises(Cancelled) as err:
        token.check()
    assert err.value.reason == "cancelled"


def test_the_scope_is_per_thread_of_execution():
    objective = random_problem("mlp", size=6)
    params = random_params(objective)
    options = MethodOptions(method="newton_cg", backend="autograd")
    expected = take_step(objective, params, options).params
    bound, release = threading.Event(), threading.Event()
    seen: list[BaseException] = []

    def cancelled_request() -> None:
        token = CancelToken()
        token.cancel()
        with engine_cancel.scope(token):
            bound.set()
            release.wait(60)
            try:
                engine_cancel.check()
            except Cancelled as exc:
                seen.append(exc)

    t = threading.Thread(target=cancelled_request)
    t.start()
    assert bound.wait(60)
    engine_cancel.check()  # this thread has no token: never cancelled
    assert torch.equal(take_step(objective, params, options).params, expected)
    release.set()
    t.join(60)
    assert len(seen) == 1


def test_newton_cg_stops_in_the_cg_iteration_that_found_the_token_cancelled():
    objective = random_problem("mlp", size=8)
    params = random_params(objective)
    options = MethodOptions(  # PSD curvature, no boundary in reach: CG runs to its tolerance
        method="gauss_newton_cg",
        backend="autograd",
        cg_forcing="fixed",
        cg_tolerance=1e-12,
        trust_radius=1e6,
        cg_max_iterations=8,
    )
    assert take_step(objective, params, options).record.cg_iterations > 3
    token = CancelAt(3)
    with pytest.raises(Cancelled) as err:
        take_step(objective, params, options, token)
    assert "CG iteration 3" in str(err.value)
    assert len(token.places) == 3


@pytest.mark.parametrize("hvp_mode", ["forward_over_reverse", "reverse_over_reverse"])
def test_analyze_curvature_stops_at_the_check_that_found_the_token_cancelled(hvp_mode):
    objective = random_problem("mlp", size=6)
    params = random_params(objective)
    options = SpectrumOptions(
        backend="autograd",
        hvp_mode=hvp_mode,
        block_size=1,
        max_lanczos_iterations=10,
        trace_samples=12,
        density_probes=0,
        batch_size=1,
    )
    done = analyze_curvature(objective, params, options)
    for k in (2, 15):  # in block Lanczos, then in the trace probes after it
        token = CancelAt(k)
        with pytest.raises(Cancelled):
            analyze_curvature(objective, params, options, token)
        assert len(token.places) == k
        assert k < done.products
    assert "products" in token.places[-1]


def test_dense_hessian_stops_between_row_chunks():
    objective = random_problem("mlp", size=6)
    params = random_params(objective)
    n = params.numel()
    token = CancelAt(3)
    with engine_cancel.scope(token), pytest.raises(Cancelled) as err:
        newton_system(objective, params, batch_budget_bytes=1)  # one row per chunk
    assert f"after 2 of {n} Hessian rows" in str(err.value)
    with pytest.raises(Cancelled):
        dense_curvature(objective, params, MethodOptions(backend="autograd"), CancelAt(1))


def test_a_run_with_a_past_deadline_token_stops_as_cancelled():
    objective = random_problem("mlp", size=6)
    run = Run(objective, random_params(objective), cancel=CancelToken.after(0.0))
    records = run.run_to_end()
    assert run.stop_reason == StopReason.CANCELLED
    assert len(records) == 1


@pytest.mark.parametrize(
    "stopping",
    [
        {"gradient_tolerance": 0.0, "parameter_tolerance": 1e-8},  # ends parameters_stalled
        {"gradient_tolerance": 0.0, "function_tolerance": 1e-12},  # ends function_stalled
        {"gradient_tolerance": 1e-9},  # ends converged
    ],
    ids=["parameters_stalled", "function_stalled", "converged"],
)
def test_a_cancel_landing_where_the_run_ends_anyway_resumes_to_the_same_records(stopping):
    # the cancel was tested before the stall tests: the run's last point was stored
    # INTERRUPTED (a shutdown) and a resume from it (no previous point there, so no stall
    # test) took one more step than the uninterrupted run
    obj = make_objective("rosenbrock", {}, {"dim": 2})
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    opts = MethodOptions(method="newton", step_policy="line_search")
    stop = StopCriteria(max_iterations=100, **stopping)
    solo = Run(obj, x0.clone(), opts, stop)
    records = [(r.iteration, r.loss, r.step_norm) for r in solo]
    last = records[-1][0]
    token = CancelToken()
    run = Run(obj, x0.clone(), opts, stop, cancel=token)
    got = []
    for r in run:
        got.append((r.iteration, r.loss, r.step_norm))
        if r.iteration == last - 1:
            token.cancel()  # the next stop test is the one that ends the run
    # the run ends as it would have: a cancel there (a shutdown's) no longer leaves a run to
    # resume from a point whose stall test a resume cannot repeat
    assert run.stop_reason == solo.stop_reason and got == records
    assert run.stop_reason is not StopReason.CANCELLED
