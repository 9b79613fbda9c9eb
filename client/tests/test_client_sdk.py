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
from hessian_client import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    aio,
    problems,
    status_name,
)

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
    assert err.value.field == "options.learning_rate" and err.value.expected == "a number > 0"
    with pytest.raises(NotFound) as err:
        client.get_run("r-does-not-exist")
    assert err.value.field == "run_id"
    with pytest.raises(InvalidArgument) as err:  # checked before sending
        client.start_run(problems.rosenbrock(), seed=0, init="normal_random")
    assert err.value.field == "init" and "objective_default" in err.value.expected


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
    assert result.info.stop_reason == "gradient_tolerance" and result.info.method == "newton"
    assert result.info.finished_at >= result.info.started_at


def test_wait_times_out_in_any_state(client):
    run = client.start_run(
        problems.rosenbrock(dim=2),
        np.array([-1.2, 1.0]),
        method="gradient_descent",
        learning_rate=1e-6,
        stopping={
            "max_iterations": 10**6,
            "gradient_tolerance": 0.0,
            "function_tolerance": 0.0,
            "parameter_tolerance": 0.0,
        },
    )
    with pytest.raises(DeadlineExceeded, match=run.id):
        run.wait(timeout=0.2)
    assert run.cancel().run_id == run.id
    assert run.wait(timeout=60).status == "CANCELLED"


def test_async_client_matches_the_sync_client(client):
    import asyncio

    target = np.random.default_rng(13).standard_normal(6)
    sync = client.newton_step(problems.mse(target), np.zeros(6), learning_rate=0.5)

    async def go():
        async with aio.Client(ADDRESS) as ac:
            step = await ac.newton_step(problems.mse(target), np.zeros(6), learning_rate=0.5)
            run = await ac.start_run(
                problems.mse(target), np.zeros(6), stopping={"max_iterations": 3}
            )
            losses = [r.loss async for r in run.stream()]
            return step, losses

    step, losses = asyncio.run(go())
    np.testing.assert_array_equal(step.params, sync.params)
    # Newton with lr 1 on mse lands on the target: loss mean(t^2), then 0
    assert losses[0] == pytest.approx(np.mean(target**2), rel=1e-12) and losses[1] <= 1e-28


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
