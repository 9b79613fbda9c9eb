"""Predict refuses new input rows whose outputs a response cannot carry before computing
them (rows x outputs per row, the width known from the problem's own rows). Before, it
computed the whole output first: a 3 MB request took 16 s and 3 GB, then was refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import start_server
from hessian_client import Client, ResourceExhausted, problems
from hessian_service.engine.objectives.mlp import MLP

LIMIT = 1 << 20  # --max-message-bytes: about 131,000 float64 values


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("predict"), max_message_bytes=LIMIT)
    yield server
    server.stop()


def test_outputs_too_big_for_a_response_are_refused_before_they_are_computed(
    handle, rng, monkeypatch
):
    x = rng.standard_normal((10, 1))
    problem = problems.mlp(x, rng.standard_normal((10, 1000)), layer_sizes=[1, 4, 1000])
    params = rng.standard_normal(1 * 4 + 4 + 4 * 1000 + 1000)
    rows_seen = []
    real = MLP.outputs
    monkeypatch.setattr(MLP, "outputs", lambda self, p: rows_seen.append(
        int(self.data["X"].shape[0])) or real(self, p))  # fmt: skip
    with Client(handle.address) as client:
        with pytest.raises(ResourceExhausted, match="inputs: 200 rows of 1000 outputs each"):
            client.predict(problem, params, inputs=rng.standard_normal((200, 1)))
        assert 200 not in rows_seen  # only a one-row probe of the output width ran
        # rows whose outputs fit are answered, equal to the float64 forward pass
        new = rng.standard_normal((100, 1))
        out = client.predict(problem, params, inputs=new)
    w1, b1 = params[:4].reshape(4, 1), params[4:8]  # (fan_out, fan_in), then the bias
    w2, b2 = params[8:4008].reshape(1000, 4), params[4008:]
    expected = np.tanh(new @ w1.T + b1) @ w2.T + b2
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_own_rows_too_big_for_a_response_are_refused_before_computing_naming_the_problem(
    handle, rng, monkeypatch
):
    # Predict without inputs ran the whole forward pass, then named inputs it never sent
    rows = 200  # x 1000 outputs: over the 131,000 values a 1 MiB response holds
    labels = rng.integers(0, 1000, rows)  # class labels: a small request, 1000 outputs a row
    problem = problems.mlp(rng.standard_normal((rows, 1)), labels, layer_sizes=[1, 4, 1000],
                           loss="cross_entropy")  # fmt: skip
    params = rng.standard_normal(1 * 4 + 4 + 4 * 1000 + 1000)
    rows_seen = []
    real = MLP.outputs
    monkeypatch.setattr(MLP, "outputs", lambda self, p: rows_seen.append(
        int(self.data["X"].shape[0])) or real(self, p))  # fmt: skip
    refused = "problem: its 200 rows of 1000 outputs each"
    with Client(handle.address) as client, pytest.raises(ResourceExhausted, match=refused):
        client.predict(problem, params)
    assert rows not in rows_seen
