"""A catalogue MLP whose forward pass would hold more than MAX_FORWARD_VALUES values (rows x
hidden and output units), or a softmax regression whose logits would (rows x classes), is
refused naming the field, at CreateProblem (the width option) and at Predict (inputs),
before anything is allocated. Before, 16 KB of data with one wide layer made a single step
take 50 s and 7 GB."""

from __future__ import annotations

import numpy as np
import pytest
from hessian_client import ResourceExhausted, problems
from hessian_service.engine.objectives.base import MAX_FORWARD_VALUES

UNITS = 4001  # [1, 4000, 1]: 12,001 parameters
TOO_MANY_ROWS = MAX_FORWARD_VALUES // UNITS + 1


def test_too_many_activations_are_refused_at_create_problem(client, rng):
    x = rng.standard_normal((TOO_MANY_ROWS, 1))
    problem = problems.mlp(x, rng.standard_normal(TOO_MANY_ROWS), layer_sizes=[1, 4000, 1])
    with pytest.raises(
        ResourceExhausted,
        match=rf"problem\.mlp\.layer_sizes: {TOO_MANY_ROWS} rows x {UNITS} hidden",
    ):
        client.create_problem(problem)
    # one row fewer is within the limit
    fits = problems.mlp(x[:-1], rng.standard_normal(TOO_MANY_ROWS - 1), layer_sizes=[1, 4000, 1])
    assert client.create_problem(fits)


def test_too_many_activations_are_refused_at_predict(client, rng):
    problem = problems.mlp(rng.standard_normal((10, 1)), rng.standard_normal(10),
                           layer_sizes=[1, 4000, 1])  # fmt: skip
    params = 0.01 * rng.standard_normal(3 * 4000 + 1)
    with pytest.raises(
        ResourceExhausted, match=rf"inputs: {TOO_MANY_ROWS} rows x {UNITS} hidden and output units"
    ):
        client.predict(problem, params, inputs=rng.standard_normal((TOO_MANY_ROWS, 1)))
    few = rng.standard_normal((3, 1))
    w1, b1 = params[:4000].reshape(4000, 1), params[4000:8000]
    w2, b2 = params[8000:12000].reshape(1, 4000), params[12000:]
    expected = np.tanh(few @ w1.T + b1) @ w2.T + b2
    np.testing.assert_allclose(client.predict(problem, params, inputs=few), expected, rtol=1e-12)


def test_too_many_logits_are_refused_for_softmax_regression(client, rng):
    classes = 1000  # with 1 feature and intercepts: 2,000 parameters
    rows = MAX_FORWARD_VALUES // classes + 1
    x = rng.standard_normal((rows, 1))
    labels = np.zeros(rows, dtype=np.int64)
    problem = problems.softmax_regression(x, labels, num_classes=classes)
    with pytest.raises(
        ResourceExhausted,
        match=rf"problem\.softmax_regression\.num_classes: {rows} rows x {classes} classes",
    ):
        client.create_problem(problem)
    small = problems.softmax_regression(x[:10], labels[:10], num_classes=classes)
    params = rng.standard_normal(2 * classes)
    with pytest.raises(ResourceExhausted, match=rf"inputs: {rows} rows x {classes} classes"):
        client.predict(small, params, inputs=x)
    logits = client.predict(small, params, inputs=x[:3])
    w = params.reshape(2, classes)  # (features + intercept, classes)
    np.testing.assert_allclose(logits, x[:3] @ w[:1] + w[1], rtol=1e-12)
