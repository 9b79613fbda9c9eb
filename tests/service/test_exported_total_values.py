"""An exported program whose values, each under the per-value limit, together declare over
MAX_TOTAL_ELEMENTS is refused at CreateProblem from its declared shapes, before it runs (an
evaluation keeps every value for the derivatives). Before, only each value was bounded: a
181 KB request made the server hold 4.4 GB."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_client import ResourceExhausted, problems
from hessian_service.engine.objectives import export_verify
from hessian_service.engine.objectives.export_verify import MAX_TOTAL_ELEMENTS, MAX_VALUE_ELEMENTS

SIDE = 2048  # each outer product a * b: 4 Mi values, under the per-value limit


def _program(terms: int):
    def loss(params, a, b):
        total = params.sum() * 0
        for k in range(terms):
            total = total + torch.sin(a * b * params[k % 3] + k).mean()
        return total

    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((1, SIDE)))
    b = torch.from_numpy(rng.standard_normal((SIDE, 1)))
    return problems.exported(loss, torch.zeros(3, dtype=torch.float64), {"a": a, "b": b}), a, b


def test_values_over_the_total_are_refused_before_the_program_runs(client, monkeypatch):
    assert SIDE * SIDE < MAX_VALUE_ELEMENTS
    terms = MAX_TOTAL_ELEMENTS // (4 * SIDE * SIDE) + 1  # four big values a term
    problem, _, _ = _program(terms)
    ran = []
    real = export_verify.Program.run
    counted = lambda *args, **kwargs: ran.append(1) or real(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(export_verify.Program, "run", counted)
    with pytest.raises(ResourceExhausted, match=r"problem\.exported\.program: its values declare"):
        client.create_problem(problem)
    assert ran == []


def test_a_program_within_the_total_runs(client):
    problem, a, b = _program(1)
    step = client.gradient_step(problem, np.zeros(3), learning_rate=0.1)
    outer = (a * b).numpy()
    expected_grad0 = np.mean(np.cos(outer * 0.0) * outer)  # d/dp0 of mean(sin(ab p0 + 0))
    np.testing.assert_allclose(step.params[0], -0.1 * expected_grad0, rtol=1e-10, atol=1e-14)
