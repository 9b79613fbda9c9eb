"""A run's line search evaluates its first trial whole, and a taken trial is the next point.

Newton with Armijo backtracking nearly always takes its first trial near a minimum; the
trial's loss and the next iteration's evaluation were two passes over the data at the same
point. A run now evaluates the first trial whole (loss, gradient, curvature) and reuses it,
while first trials keep being taken; one rejected first trial returns the next search to
the loss alone. Checked by counting the objective's evaluations, against the same run with
the reuse off (the same steps, losses to rounding), on fresh random problems.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective, take_step
from hessian_service.engine.backends import selector
from hessian_service.engine.solvers import methods
from problems import NO_TOL, random_params, random_problem


def _system_calls(monkeypatch: pytest.MonkeyPatch, run: Run) -> list[int]:
    """Counts the backend's system assemblies (loss, gradient and matrix at a point)."""
    calls = [0]
    system = run.stepper.backend.system
    assemble = system.newton_system

    def counted(*args, **kwargs):
        calls[0] += 1
        return assemble(*args, **kwargs)

    monkeypatch.setattr(system, "newton_system", counted)
    return calls


def _loss_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    loss_value = methods.curvature.loss_value

    def counted(objective, x):
        calls[0] += 1
        return loss_value(objective, x)

    monkeypatch.setattr(methods.curvature, "loss_value", counted)
    return calls


def _facts(records) -> list[tuple]:
    return [(r.iteration, r.step_size, r.function_evaluations, r.step_accepted) for r in records]


def _run(objective, x0, reuse: bool, monkeypatch, **options):
    stopping = StopCriteria(max_iterations=60, gradient_tolerance=1e-10)
    run = Run(objective, x0, MethodOptions(method="newton", **options), stopping)
    run.stepper.reuse_trials = reuse
    with monkeypatch.context() as patch:
        systems, losses = _system_calls(patch, run), _loss_calls(patch)
        records = run.run_to_end()
    return records, systems[0], losses[0], run.params


@pytest.mark.parametrize("name", ["logistic_regression", "softmax_regression", "least_squares"])
def test_taken_first_trials_are_evaluated_once(name, monkeypatch):
    objective = random_problem(name)
    x0 = 0.1 * random_params(objective)
    records, systems, losses, x = _run(objective, x0, True, monkeypatch)
    plain, plain_systems, plain_losses, plain_x = _run(objective, x0, False, monkeypatch)
    steps = len(records) - 1
    assert steps >= 1 and all(r.function_evaluations == 1 for r in records[:-1])
    # one assembly per point, no separate trial loss; the old way: a loss per step besides
    assert (systems, losses) == (len(records), 0)
    assert (plain_systems, plain_losses) == (len(plain), steps)
    assert _facts(records) == _facts(plain)
    np.testing.assert_allclose([r.loss for r in records], [r.loss for r in plain], rtol=1e-13)
    torch.testing.assert_close(x, plain_x, rtol=1e-12, atol=1e-12)


def test_a_rejected_first_trial_sends_the_next_search_back_to_the_loss_alone(monkeypatch):
    # Rosenbrock from its standard start: Newton's full step overshoots often
    objective = make_objective("rosenbrock", {}, {"dim": 2})
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    records, systems, losses, x = _run(objective, x0, True, monkeypatch)
    plain, plain_systems, plain_losses, plain_x = _run(objective, x0, False, monkeypatch)
    assert _facts(records) == _facts(plain)
    np.testing.assert_allclose([r.loss for r in records], [r.loss for r in plain], rtol=1e-12)
    torch.testing.assert_close(x, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(x, plain_x, rtol=1e-12, atol=1e-12)
    evaluations = [r.function_evaluations for r in records[:-1]]
    assert any(e > 1 for e in evaluations), evaluations
    # the policy: the first search, and each after one whose first trial was taken, tries
    # whole; a whole trial rejected is one assembly wasted, one taken saves a loss
    whole = [i == 0 or evaluations[i - 1] == 1 for i in range(len(evaluations))]
    wasted = sum(w and e > 1 for w, e in zip(whole, evaluations, strict=True))
    assert systems == len(records) + wasted
    assert losses == sum(evaluations) - sum(whole)
    assert (plain_systems, plain_losses) == (len(plain), sum(evaluations))


def test_a_single_step_never_assembles_at_its_trial(monkeypatch):
    objective = random_problem("logistic_regression")
    x0 = random_params(objective)
    options = MethodOptions(method="newton", step_policy="line_search", backend="autograd")
    system = type(selector.resolve("autograd", objective, x0, "hessian").system)
    calls = [0]
    assemble = system.newton_system

    def counted(*args, **kwargs):
        calls[0] += 1
        return assemble(*args, **kwargs)

    monkeypatch.setattr(system, "newton_system", counted)
    losses = _loss_calls(monkeypatch)
    result = take_step(objective, x0, options)
    assert result.record.function_evaluations >= 1
    assert calls[0] == 1 and losses[0] == result.record.function_evaluations


def test_the_reuse_state_resumes_with_the_run():
    objective = make_objective("rosenbrock", {}, {"dim": 4})
    x0 = objective.init_params()
    options = MethodOptions(method="newton")
    stopping = StopCriteria(max_iterations=30, **NO_TOL)
    full = Run(objective, x0, options, stopping).run_to_end()
    for k in range(1, 12):
        first = Run(objective, x0, options, stopping)
        for record in first:
            if record.iteration == k:
                break
        checkpoint = first.checkpoint()
        assert checkpoint.state["whole_trial"] in (0.0, 1.0)
        resumed = Run(objective, x0, options, stopping, resume=checkpoint).run_to_end()
        assert [(r.loss, r.step_size) for r in resumed] == [(r.loss, r.step_size) for r in full[k:]]
