"""Refusals and results that said the wrong thing (a new user's reading of them): a resume
of a finished run whose problem was deleted said the problem was missing, a queued run was
"executing", Predict's shape refusal repeated the shape it refused, a matrix-shaped
problem's gradient and stored parameters came back flat, list_runs(status=None) raised a
bare TypeError, and a run failing before its first record was an UNKNOWN status."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
from conftest import occupy_workers, start_server
from hessian_client import Client, FailedPrecondition, InvalidArgument, RunFailed, problems


def test_resuming_a_finished_run_says_it_is_finished_even_once_its_problem_is_gone(client):
    run = client.start_run(problems.rosenbrock(dim=2), np.array([-1.2, 1.0]),
                           stopping={"max_iterations": 3})  # fmt: skip
    assert run.wait(60).status == "FINISHED"
    client.delete_problem(run.info().problem_id)
    with pytest.raises(FailedPrecondition) as err:
        client.resume_run(run.id)
    assert err.value.field == "run_id" and "is FINISHED, not INTERRUPTED" in str(err.value)


def test_deleting_a_queued_run_says_it_is_queued(tmp_path):
    handle = start_server(tmp_path, workers=1)
    gate = occupy_workers(handle)
    try:
        with Client(handle.address, timeout=60) as client:
            run = client.start_run(problems.rosenbrock(dim=2), np.zeros(2))
            with pytest.raises(FailedPrecondition) as err:
                client.delete_run(run.id)
            assert f"run {run.id} is QUEUED; cancel it first" in str(err.value)
            client.cancel_run(run.id)
    finally:
        gate.set()
        handle.stop(grace=1.0)


def test_predict_refuses_rows_of_the_wrong_rank_saying_what_it_expects(client):
    x = np.random.default_rng(0).normal(size=(20, 3))
    pid = client.create_problem(problems.logistic_regression(x, (x[:, 0] > 0).astype(float)))
    with pytest.raises(InvalidArgument) as err:
        client.predict(pid, np.zeros(4), np.zeros(3))  # one row given as a vector
    assert err.value.field == "inputs"
    # it said "expected rows of shape (3,) (...), got shape (3,)"
    assert "a 2-D array shaped (rows, 3)" in str(err.value) and "got shape (3,)" in str(err.value)


@pytest.fixture()
def matrix_problem():
    rng = np.random.default_rng(7)
    target = rng.normal(size=(2, 3))
    return problems.mse(target), target, rng.normal(size=(2, 3))


def test_a_gradient_comes_back_shaped_as_the_parameters_were_sent(client, matrix_problem):
    problem, target, x = matrix_problem
    hess = client.compute_hessian(problem, x)
    # mse: mean((x - target)^2) over the 6 values, gradient 2 (x - target) / 6 (float64)
    want = 2 * (x - target) / 6
    assert hess.gradient.shape == (2, 3)
    np.testing.assert_allclose(hess.gradient, want, rtol=1e-13, atol=1e-15)
    flat = client.compute_hessian(problem, x.ravel())  # sent flat, answered flat
    np.testing.assert_array_equal(flat.gradient, hess.gradient.ravel())
    as_torch = client.compute_hessian(problem, torch.from_numpy(x))
    assert tuple(as_torch.gradient.shape) == (2, 3)


def test_a_run_s_stored_parameters_come_back_in_the_objective_s_shape(client, matrix_problem):
    problem, target, x = matrix_problem
    started = client.start_run(problem, x, stopping={"max_iterations": 2})
    mine = started.result(60).params
    assert mine.shape == (2, 3)
    for params in (
        client.get_run(started.id, include_params=True).final_params,
        client.run(started.id).result(60).params,  # a handle that did not start it
        client.start_run(problem, seed=3, stopping={"max_iterations": 2}).result(60).params,
    ):
        assert params.shape == (2, 3)
    np.testing.assert_array_equal(client.run(started.id).result(60).params, mine)
    # the fixed-step Newton step of mse lands on the target
    np.testing.assert_allclose(mine, target, rtol=1e-12, atol=1e-12)


def test_list_runs_with_status_none_lists_every_run(client):
    every = [r.run_id for r in client.list_runs(page_size=1000)]
    assert [r.run_id for r in client.list_runs(status=None, page_size=1000)] == every


def test_a_run_failing_before_its_first_record_is_an_aborted_run_not_an_unknown_error(client):
    # float32 overflow at the start: the loss is not finite there, no record is made
    a = np.eye(2, dtype=np.float32)
    run = client.start_run(problems.quadratic(a, np.zeros(2, np.float32)),
                           np.array([3e38, 3e38], np.float32))  # fmt: skip
    with pytest.raises(RunFailed) as err:
        run.result(60)
    assert err.value.code == grpc.StatusCode.ABORTED and str(err.value).startswith("ABORTED: ")


def test_a_request_over_the_server_s_lower_message_limit_names_its_field(tmp_path):
    # the client's limit is 64 MiB, the server's 8 KiB: gRPC's "SERVER: Received message
    # larger than max (16,xxx vs. 8192)" named no field
    from hessian_client import ResourceExhausted, aio

    handle = start_server(tmp_path, max_message_bytes=8192)
    try:
        with Client(handle.address, timeout=60) as client:
            pid = client.create_problem(problems.rosenbrock(dim=2))
            for field, call in (
                (
                    "problem",
                    lambda: client.newton_step(problems.mse(np.zeros(2000)), np.zeros(2000)),
                ),
                ("initial_params", lambda: client.start_run(pid, np.zeros(2000))),
                ("initial_params", lambda: client.start_run(pid, np.zeros(2000), watch=True)),
            ):
                with pytest.raises(ResourceExhausted) as err:
                    call()
                assert err.value.field == field and err.value.from_server
                assert "over the server's 8,192-byte message limit" in str(err.value)

        async def main() -> None:
            async with aio.Client(handle.address, timeout=60) as ac:
                await ac.create_problem(problems.mse(np.zeros(2000)))

        with pytest.raises(ResourceExhausted) as err:
            asyncio.run(main())
        assert err.value.field == "problem"
    finally:
        handle.stop(grace=1.0)


def test_racing_deletes_of_one_run_delete_it_once_and_the_others_are_not_found(client):
    # a delete that lost the race answered OK with deleted=False (the SDK's False, no error)
    from concurrent.futures import ThreadPoolExecutor

    from hessian_client import NotFound

    for _ in range(5):
        run = client.start_run(problems.rosenbrock(dim=2), np.zeros(2),
                               stopping={"max_iterations": 2})  # fmt: skip
        run.wait(60)

        def delete(run_id=run.id):
            try:
                return client.delete_run(run_id)
            except NotFound:
                return "not found"

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: delete(), range(6)))
        assert answers.count(True) == 1 and answers.count("not found") == 5, answers
