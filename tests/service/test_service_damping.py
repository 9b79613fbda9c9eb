"""`damping` is optional on the wire: unset and an explicit 0 behave as documented (issue 12).

Documented (optimize.proto): default 0, no damping; levenberg_marquardt, which damps with
damping x diag H (Marquardt's scaling, the diagonal floored at sqrt(eps) x its largest),
then starts from 1e-3. So a step with damping unset and one with damping=0 must be bit for
bit the same, and both must equal an independent float64 reference (numpy on the
least-squares normal equations: H = X^T X / N, g = X^T (X w - y) / N), to 1e-10 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_client import InvalidArgument, problems
from hessian_client.options import method_options
from hessian_service.server import codec

TOL = 1e-10


def _least_squares(rng: np.random.Generator):
    """(problem, start, H, g) on fresh random float64 data (replayable: torch's test seed)."""
    n, d = 31, 5
    x = rng.standard_normal((n, d))
    y = rng.standard_normal(n)
    w = rng.standard_normal(d)
    h = x.T @ x / n
    g = x.T @ (x @ w - y) / n
    return problems.least_squares(x, y), w, h, g


@pytest.mark.parametrize("policy", ["fixed", "levenberg_marquardt"])
def test_unset_and_zero_damping_take_the_documented_step(client, policy):
    problem, w, h, g = _least_squares(np.random.default_rng(torch.initial_seed()))
    unset = client.newton_step(problem, w, step_policy=policy)
    zero = client.newton_step(problem, w, step_policy=policy, damping=0.0)
    assert np.array_equal(unset.params, zero.params)
    assert unset.record.damping == zero.record.damping
    lam = 1e-3 if policy == "levenberg_marquardt" else 0.0
    assert unset.record.damping == lam
    if policy == "levenberg_marquardt":
        assert unset.record.step_accepted  # a quadratic: the damped Newton step lowers the loss
    diag = np.abs(np.diag(h))
    scaling = np.diag(np.maximum(diag, np.sqrt(np.finfo(float).eps) * diag.max()))
    expected = w - np.linalg.solve(h + lam * scaling, g)
    np.testing.assert_allclose(unset.params, expected, rtol=TOL, atol=TOL)


def test_an_explicit_damping_is_carried(client):
    problem, w, h, g = _least_squares(np.random.default_rng(torch.initial_seed()))
    step = client.newton_step(problem, w, step_policy="fixed", damping=0.5)
    assert step.record.damping == 0.5
    expected = w - np.linalg.solve(h + 0.5 * np.eye(len(w)), g)
    np.testing.assert_allclose(step.params, expected, rtol=TOL, atol=TOL)


def test_damping_has_presence_on_the_wire():
    assert not method_options().HasField("damping")
    zero = method_options(damping=0.0)
    assert zero.HasField("damping")
    assert codec.options_to_dict(zero) == {"damping": 0.0}
    assert "damping" not in codec.options_to_dict(method_options())
    assert codec.options_to_wire({"damping": 0.0}).HasField("damping")


def test_a_run_reports_its_effective_damping(client):
    problem, w, _, _ = _least_squares(np.random.default_rng(torch.initial_seed()))
    unset = client.start_run(problem, w, stopping={"max_iterations": 1}).wait(timeout=60)
    given = client.start_run(problem, w, damping=0.25, stopping={"max_iterations": 1})
    given = given.wait(timeout=60)
    assert unset.options.damping == 0.0  # the default, reported as applied (None: unset)
    assert given.options.damping == 0.25


@pytest.mark.parametrize("dtype, cap", [(np.float64, 2.0**52), (np.float32, 2.0**23)])
def test_a_damping_past_the_cap_is_refused_alike_by_a_step_and_a_run(client, dtype, cap):
    """The damping scales diag H, so its cap (1 / eps of the dtype) needs no H: StartRun
    refuses it at the door as NewtonStep does, where it ran to `no_progress` at iteration 0;
    a damping just below the cap is a step."""
    rng = np.random.default_rng(torch.initial_seed())
    x, y = rng.standard_normal((31, 5)).astype(dtype), rng.standard_normal(31).astype(dtype)
    problem, w = problems.least_squares(x, y), rng.standard_normal(5).astype(dtype)
    lm = {"step_policy": "levenberg_marquardt", "damping": 2 * cap}
    expected = f"options.damping: expected a Levenberg-Marquardt damping <= 1 / eps = {cap:.3g}"
    before = len(list(client.list_runs()))
    with pytest.raises(InvalidArgument) as step:
        client.newton_step(problem, w, **lm)
    with pytest.raises(InvalidArgument) as run:
        client.start_run(problem, w, **lm)
    for caught in (step, run):
        assert caught.value.field == "options.damping"
        assert caught.value.message.startswith(expected), caught.value.message
    assert len(list(client.list_runs())) == before
    below = client.newton_step(problem, w, step_policy="levenberg_marquardt", damping=cap / 2)
    assert below.record.damping in (cap / 2, cap)  # the next lambda when it was rejected
