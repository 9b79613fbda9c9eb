"""The client SDK against a live server, in an environment without torch.

Run by tests/service/test_client_venv.py inside a fresh venv that has only
`pip install ./client pytest`; HESSIAN_TEST_ADDRESS names the server and
HESSIAN_TEST_SEED_TABLE a file holding the engine's seed table. References here are
closed forms computed with numpy in float64.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest
from hessian_client import Client, InvalidArgument, NotFound, problems, status_name

ADDRESS = os.environ.get("HESSIAN_TEST_ADDRESS", "")
pytestmark = pytest.mark.skipif(not ADDRESS, reason="HESSIAN_TEST_ADDRESS is not set")


@pytest.fixture(scope="module")
def client():
    with Client(ADDRESS, timeout=60) as c:
        yield c


def test_torch_is_absent_and_never_imported():
    if os.environ.get("HESSIAN_TEST_EXPECT_NO_TORCH") == "1":
        assert importlib.util.find_spec("torch") is None
    assert "torch" not in sys.modules


def test_server_info(client):
    info = client.info()
    assert info.version
    assert "mse" in info.objectives and "newton" in info.methods
    assert info.limits.max_params > 0


def test_newton_step_on_mse_is_the_closed_form(client):
    rng = np.random.default_rng(11)
    target, x = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    lr = 0.3
    got = client.newton_step(problems.mse(target), x, learning_rate=lr)
    # H = 2/n I and g = 2/n (x - t): the Newton step is exactly (x - t).
    np.testing.assert_allclose(got.params, x - lr * (x - target), rtol=1e-12, atol=1e-12)
    assert got.record.loss == pytest.approx(np.mean((x - target) ** 2), rel=1e-12)


def test_gradient_step_on_least_squares_matches_numpy(client):
    rng = np.random.default_rng(12)
    x, y, w = rng.standard_normal((30, 4)), rng.standard_normal(30), rng.standard_normal(4)
    l2, lr = 0.2, 0.05
    got = client.gradient_step(problems.least_squares(x, y, l2=l2), w, learning_rate=lr)
    grad = x.T @ (x @ w - y) / len(y) + l2 * w
    np.testing.assert_allclose(got.params, w - lr * grad, rtol=1e-12, atol=1e-12)


def test_float32_in_float32_out(client):
    target = np.arange(4, dtype=np.float32)
    got = client.newton_step(problems.mse(target), np.zeros(4, dtype=np.float32))
    assert got.params.dtype == np.float32
    np.testing.assert_allclose(got.params, target, rtol=1e-6)


def test_typed_errors_carry_code_and_field(client):
    with pytest.raises(InvalidArgument) as err:
        client.newton_step(problems.mse(np.zeros(3)), np.zeros(3), learning_rate=-1.0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.learning_rate" in err.value.message
    with pytest.raises(NotFound) as err:
        client.get_run("r-does-not-exist")
    assert "run_id" in err.value.message


def test_run_streams_every_record_and_returns_its_result(client):
    run = client.start_run(
        problems.rosenbrock(dim=2),
        seed=0,
        method="newton",
        step_policy="line_search",
        stopping={"max_iterations": 200},
    )
    records = list(run.stream())
    assert [r.iteration for r in records] == list(range(len(records)))
    assert status_name(run.final) == "FINISHED" and run.final.converged
    result = run.result()
    np.testing.assert_allclose(result.params, np.ones(2), atol=1e-5)


def test_cli_seed_prints_the_engines_table():
    expected_path = os.environ.get("HESSIAN_TEST_SEED_TABLE")
    if not expected_path:
        pytest.skip("HESSIAN_TEST_SEED_TABLE is not set")
    exe = shutil.which("hessian", path=str(pathlib.Path(sys.executable).parent))
    assert exe, "the `hessian` console script is installed with the package"
    out = subprocess.run(
        [exe, "--address", ADDRESS, "seed"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == pathlib.Path(expected_path).read_text()
