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
from problems import random_params, random_problem


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
    run.stepper.reuse_trials &= reuse  # off for the comparison; on as the run decided
    with monkeypatch.context() as patch:
        systems, losses = _system_calls(patch, run), _loss_calls(patch)
        records = run.run_to_end()
    return records, systems[0], losses[0], run.params


def _expected(evaluations: list[int], whole_first: bool = True) -> tuple[int, int]:
    """(assemblies beyond one per point, trial losses) the policy implies for steps with
    these function evaluations: the first search (`whole_first`), and each after one whose
    first trial was taken, tries whole; a whole trial rejected is an assembly wasted, one
    taken saves a loss."""
    whole = [evaluations[i - 1] == 1 if i else whole_first for i in range(len(evaluations))]
    wasted = sum(w and e > 1 for w, e in zip(whole, evaluations, strict=True))
    return wasted, sum(evaluations) - sum(whole)


@pytest.mark.parametrize("name", ["logistic_regression", "softmax_regression", "least_squares"])
def test_whole_first_trials_follow_the_policy_and_change_no_step(name, monkeypatch):
    objective = random_problem(name)
    x0 = 0.1 * random_params(objective)
    records, systems, losses, x = _run(objective, x0, True, monkeypatch)
    plain, plain_systems, plain_losses, plain_x = _run(objective, x0, False, monkeypatch)
    evaluations = [r.function_evaluations for r in records[:-1]]
    assert evaluations and evaluations[0] >= 1
    wasted, trial_losses = _expected(evaluations)
    assert (systems, losses) == (len(records) + wasted, trial_losses)
    assert (plain_systems, plain_losses) == (len(plain), sum(evaluations))
    assert _facts(records) == _facts(plain)
    np.testing.assert_allclose([r.loss for r in records], [r.loss for r in plain], rtol=1e-13)
    torch.testing.assert_close(x, plain_x, rtol=1e-12, atol=1e-12)


def test_on_breast_cancer_every_step_is_one_assembly(monkeypatch):
    """Newton from zeros on standardised breast-cancer data takes every first trial: each
    point is assembled once and no loss is evaluated apart (it was a loss per step)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.float64)
    objective = make_objective("logistic_regression", {"X": x, "y": y}, {"l2": 1.0 / len(y)})
    x0 = torch.zeros(x.shape[1] + 1, dtype=torch.float64)
    records, systems, losses, _ = _run(objective, x0, True, monkeypatch)
    assert len(records) >= 5 and all(r.function_evaluations == 1 for r in records[:-1])
    assert (systems, losses) == (len(records), 0)
    assert records[-1].gradient_max_norm <= 1e-10


def test_a_dense_problem_over_the_size_bound_never_assembles_at_a_trial(monkeypatch):
    objective = random_problem("logistic_regression", size=methods.WHOLE_TRIAL_MAX_PARAMS)
    x0 = 0.1 * random_params(objective)
    assert x0.numel() > methods.WHOLE_TRIAL_MAX_PARAMS
    records, systems, losses, _ = _run(objective, x0, True, monkeypatch)
    evaluations = [r.function_evaluations for r in records[:-1]]
    assert (systems, losses) == (len(records), sum(evaluations))


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
    wasted, trial_losses = _expected(evaluations)
    assert wasted >= 1 and (systems, losses) == (len(records) + wasted, trial_losses)
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


def test_the_reuse_state_resumes_with_the_run(monkeypatch):
    """A run resumed from a checkpoint decides whole trials as the uninterrupted run did,
    also right after a rejected first trial (the choice travels in the checkpoint)."""
    objective = make_objective("rosenbrock", {}, {"dim": 2})
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    options = MethodOptions(method="newton")
    stopping = StopCriteria(max_iterations=60, gradient_tolerance=1e-10)
    full = Run(objective, x0, options, stopping).run_to_end()
    evaluations = [r.function_evaluations for r in full[:-1]]
    after_rejection = [k for k in range(1, len(evaluations)) if evaluations[k - 1] > 1]
    assert after_rejection, evaluations
    for k in [*after_rejection[:3], 1]:
        first = Run(objective, x0, options, stopping)
        for record in first:
            if record.iteration == k:
                break
        checkpoint = first.checkpoint()
        assert checkpoint.state["whole_trial"] == float(evaluations[k - 1] == 1)
        resumed = Run(objective, x0, options, stopping, resume=checkpoint)
        with monkeypatch.context() as patch:
            systems, losses = _system_calls(patch, resumed), _loss_calls(patch)
            tail = resumed.run_to_end()
        assert [(r.loss, r.step_size) for r in tail] == [(r.loss, r.step_size) for r in full[k:]]
        wasted, trial_losses = _expected(evaluations[k:], evaluations[k - 1] == 1)
        assert (systems[0], losses[0]) == (len(tail) + wasted, trial_losses), k
