"""Stops and refusals through a real server (issue 13 items 1, 3, 5, 6; issue 11 D3)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hessian_client import HessianError, InvalidArgument, RunFailed, problems, status_name
from hessian_client.proto import optimize_pb2
from hessian_service.engine.errors import ValidationError
from hessian_service.engine.records import StepRecord, StopReason
from hessian_service.server import codec, runs
from sklearn.datasets import load_breast_cancer

GN_REFUSAL = "it has no Gauss-Newton form"


def _no_gauss_newton_calls(client):
    """Every entry that can be asked for Gauss-Newton curvature on a rosenbrock problem."""
    problem = client.create_problem(problems.rosenbrock(dim=3))
    x = np.full(3, 0.3)
    return {
        "options.curvature": [
            lambda: client.newton_step(problem, x, curvature="gauss_newton"),
            lambda: client.newton_step(problem, x, method="saddle_free", curvature="gauss_newton"),
            lambda: client.start_run(problem, x, method="newton", curvature="gauss_newton"),
            lambda: client.start_run(problem, x, method="newton_cg", curvature="gauss_newton"),
            lambda: client.analyze_curvature(problem, x, curvature="gauss_newton"),
        ],
        "options.method": [
            lambda: client.newton_step(problem, x, method="gauss_newton_cg"),
            lambda: client.start_run(problem, x, method="gauss_newton_cg"),
        ],
        "curvature": [lambda: client.compute_hessian(problem, x, curvature="gauss_newton")],
    }


def test_gauss_newton_without_its_form_is_invalid_argument_at_every_entry(client):
    before = len(list(client.list_runs()))
    messages = set()
    for field, calls in _no_gauss_newton_calls(client).items():
        for call in calls:
            with pytest.raises(InvalidArgument) as err:
                call()
            assert err.value.message.startswith(field + ":"), err.value.message
            assert GN_REFUSAL in err.value.message
            messages.add(err.value.message.removeprefix(field))
    assert len(messages) == 1, messages
    assert len(list(client.list_runs())) == before  # StartRun stored nothing


def test_a_run_failing_before_its_first_record_makes_stream_raise(client, monkeypatch):
    def broken(*args, **kwargs):
        raise ValidationError("options", "something the engine refuses late", "injected")

    monkeypatch.setattr(runs, "Run", broken)  # the server runs in this process
    run = client.start_run(problems.rosenbrock(dim=2), np.zeros(2), method="newton")
    with pytest.raises(HessianError) as err:
        list(run.stream())
    assert "failed before its first record" in str(err.value) and "injected" in str(err.value)
    assert status_name(run.final) == "FAILED" and run.final.num_records == 0


def test_a_run_not_finite_at_its_start_fails_and_stream_raises(client):
    run = client.start_run(problems.rosenbrock(dim=2), np.full(2, 1e200), method="newton")
    with pytest.raises(RunFailed) as err:
        list(run.stream())
    assert "failed before its first record" in str(err.value)
    assert "not finite at the initial parameters" in str(err.value)
    assert err.value.run_id == run.id and err.value.info.stop_reason == "non_finite"
    again = copy.copy(err.value)  # rebuilt from its own arguments, not from args
    assert (again.run_id, again.info, str(again)) == (run.id, err.value.info, str(err.value))
    with pytest.raises(RunFailed):
        run.result(timeout=30)
    info = client.get_run(run.id)
    assert status_name(info) == "FAILED" and info.stop_reason == "non_finite"
    assert info.num_records == 0 and not info.converged


def _mlp_at_a_saddle(rng) -> tuple[object, np.ndarray]:
    """A tanh mlp at zero weights, its output bias at mean(y): the gradient is exactly 0."""
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 1))
    params = np.zeros(4 * 6 + 6 + 6 + 1)
    params[-1] = y.mean()
    return problems.mlp(x, y, layer_sizes=[4, 6, 1], activation="tanh"), params


@pytest.mark.parametrize("method", ["newton", "saddle_free"])
def test_a_stationary_saddle_is_not_reported_as_converged(client, rng, method):
    problem, params = _mlp_at_a_saddle(rng)
    run = client.start_run(problem, params, method=method)
    (record,) = list(run.stream())
    h = client.compute_hessian(problem, params).matrix
    evals = np.linalg.eigvalsh(h)
    negatives = int((evals < -len(evals) * np.finfo(np.float64).eps * np.abs(evals).max()).sum())
    assert negatives > 0  # the fixture is a saddle, by a float64 eigendecomposition
    assert run.final.stop_reason == "gradient_tolerance" and not run.final.converged
    assert record.end_point == "saddle" and record.negative_eigenvalues == negatives
    assert f"not a minimum: the Hessian there has {negatives} negative" in run.final.message
    # the same problem from a generic start converges to a point the Hessian calls a minimum
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    done = client.start_run(
        problems.logistic_regression(x, y * 1.0, l2=1e-3), np.zeros(31), method=method
    )
    last = list(done.stream())[-1]
    assert done.final.stop_reason == "gradient_tolerance" and done.final.converged
    assert last.end_point == "minimum" and "not a minimum" not in done.final.message


def test_levenberg_marquardt_below_rounding_finishes_with_no_progress(client):
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    problem = client.create_problem(problems.logistic_regression(x, y * 1.0, l2=1e-3))
    for backend in ("native", "autograd"):
        run = client.start_run(
            problem,
            np.zeros(31),
            method="newton",
            step_policy="levenberg_marquardt",
            backend=backend,
            stopping={
                "max_iterations": 300,
                "gradient_tolerance": 1e-30,
                "function_tolerance": 0.0,
                "parameter_tolerance": 0.0,
            },
        )
        records = list(run.stream())
        assert status_name(run.final) == "FINISHED", run.final.message
        assert run.final.stop_reason == "no_progress"
        assert not run.final.converged and "machine precision" in run.final.message
        assert np.isfinite([r.damping for r in records]).all()


def test_gradient_descent_with_default_criteria_runs_its_iterations(client):
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    run = client.start_run(
        problems.logistic_regression(x, y * 1.0, l2=1e-3),
        np.zeros(31),
        method="gradient_descent",
        learning_rate=1e-7,
        stopping={"max_iterations": 10},
    )
    records = list(run.stream())
    assert len(records) == 11 and run.final.stop_reason == "max_iterations"
    assert not run.final.converged


@pytest.mark.parametrize(
    ("method", "sent", "shown"),
    [
        ("newton", {}, 1e-8),
        ("newton_cg", {}, 1e-8),
        ("gradient_descent", {}, 0.0),
        ("newton", {"parameter_tolerance": 1e-3}, 1e-3),
        ("gradient_descent", {"parameter_tolerance": 0.0}, 0.0),
    ],
)
def test_a_run_info_shows_the_criteria_the_run_obeys(client, method, sent, shown):
    # the parameter test's default depends on the method: RunInfo says which one applied
    run = client.start_run(
        problems.rosenbrock(dim=2),
        np.zeros(2),
        method=method,
        stopping={"max_iterations": 2, **sent},
    )
    stopping = run.wait().stopping
    assert stopping.parameter_tolerance is not None and stopping.parameter_tolerance == shown
    assert stopping.max_iterations == 2 and stopping.gradient_tolerance == 1e-10
    assert stopping.function_tolerance == 0.0


def test_every_engine_stop_reason_has_its_own_wire_value():
    values = [codec.stop_reason_value(reason) for reason in StopReason]
    assert 0 not in values and len(set(values)) == len(values)
    for reason, value in zip(StopReason, values, strict=True):
        assert optimize_pb2.StopReason.Name(value) == "STOP_REASON_" + reason.name


@pytest.mark.parametrize("verdict", ["minimum", "saddle", "maximum", "flat", ""])
def test_a_record_carries_its_end_point_and_damping_flag(verdict):
    record = StepRecord(iteration=3, loss=1.0, end_point=verdict, step_damped=True)
    wire = codec.record_to_wire(record)
    expected = "VERDICT_" + (verdict or "unspecified").upper()
    assert optimize_pb2.Verdict.Name(wire.end_point) == expected and wire.step_damped


def test_compute_hessian_counts_no_rounding_negatives_in_a_gauss_newton_matrix(client, rng):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64).numpy()
    y = torch.randn(5, 1, generator=gen, dtype=torch.float64).numpy()
    problem = problems.mlp(x, y, layer_sizes=[4, 8, 8, 1])
    params = 0.5 * rng.normal(size=121)
    result = client.compute_hessian(problem, params, curvature="gauss_newton")
    evals = np.linalg.eigvalsh(result.matrix)
    tol = 121 * np.finfo(np.float64).eps * np.abs(evals).max()
    assert result.summary.negative_tolerance == pytest.approx(tol, rel=1e-6)
    assert result.summary.negative_eigenvalues == int((evals < -tol).sum()) == 0
    assert not result.summary.positive_definite


@pytest.mark.parametrize(("dtype", "shown"), [(np.float32, 1e-6), (np.float64, 1e-10)])
def test_a_run_info_shows_the_gradient_tolerance_of_the_parameters_dtype(client, dtype, shown):
    # Rosenbrock holds no data (its dtype is the parameters'): a float32 run was stored and
    # run with float64's 1e-10, which float32 cannot meet
    run = client.start_run(problems.rosenbrock(dim=2), np.zeros(2, dtype=dtype),
                           stopping={"max_iterations": 2})  # fmt: skip
    assert run.wait().stopping.gradient_tolerance == shown
