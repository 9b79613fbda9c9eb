"""A catalogue MLP whose forward pass would hold more than MAX_ACTIVATIONS values (rows x
hidden and output units) is refused naming the field, at CreateProblem (data.X) and at
Predict (inputs), before anything is allocated. Before, 16 KB of data with one wide layer
made a single step take 50 s and 7 GB."""

from __future__ import annotations

import numpy as np
import pytest
from hessian_client import ResourceExhausted, problems
from hessian_service.engine.objectives.mlp import MAX_ACTIVATIONS

UNITS = 4001  # [1, 4000, 1]: 12,001 parameters
TOO_MANY_ROWS = MAX_ACTIVATIONS // UNITS + 1


def test_too_many_activations_are_refused_at_create_problem(client, rng):
    x = rng.standard_normal((TOO_MANY_ROWS, 1))
    problem = problems.mlp(x, rng.standard_normal(TOO_MANY_ROWS), layer_sizes=[1, 4000, 1])
    with pytest.raises(ResourceExhausted, match=rf"data\.X: {TOO_MANY_ROWS} rows x {UNITS} units"):
        client.create_problem(problem)
    # one row fewer is within the limit
    fits = problems.mlp(x[:-1], rng.standard_normal(TOO_MANY_ROWS - 1), layer_sizes=[1, 4000, 1])
    assert client.create_problem(fits)


def test_too_many_activations_are_refused_at_predict(client, rng):
    problem = problems.mlp(rng.standard_normal((10, 1)), rng.standard_normal(10),
                           layer_sizes=[1, 4000, 1])  # fmt: skip
    params = 0.01 * rng.standard_normal(3 * 4000 + 1)
    with pytest.raises(ResourceExhausted, match=rf"inputs: {TOO_MANY_ROWS} rows x {UNITS} units"):
        client.predict(problem, params, inputs=rng.standard_normal((TOO_MANY_ROWS, 1)))
    few = rng.standard_normal((3, 1))
    w1, b1 = params[:4000].reshape(4000, 1), params[4000:8000]
    w2, b2 = params[8000:12000].reshape(1, 4000), params[12000:]
    expected = np.tanh(few @ w1.T + b1) @ w2.T + b2
    np.testing.assert_allclose(client.predict(problem, params, inputs=few), expected, rtol=1e-12)
