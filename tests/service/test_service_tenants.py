"""Tenants, against a real server with token files: a run and a problem belong to the token
that created them, other tokens get NOT_FOUND (worded as for an id that never existed), an
admin token sees everything, and an open server is one anonymous tenant with one run quota."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import start_server
from hessian_client import (
    Client,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    problems,
    status_name,
)
from hessian_client.proto import service_pb2, service_pb2_grpc
from long_runs import ENDLESS

LONG = {
    "method": "gradient_descent",
    "learning_rate": 1e-9,
    "stopping": ENDLESS,
}
MISSING_RUN = "r-00000000000000000000000000000000"
MISSING_PROBLEM = "p-0000000000000000000000000000000000000000"


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenants")
    (tmp / "tokens").write_text("alpha-token\nbeta-token\n")
    (tmp / "admins").write_text("root-token\n")
    handle = start_server(
        tmp / "data",
        auth_token_file=str(tmp / "tokens"),
        admin_token_file=str(tmp / "admins"),
        max_runs_per_token=2,
    )
    yield handle
    handle.stop(grace=1.0)


def _client(handle, token: str) -> Client:
    return Client(handle.address, token=token, timeout=30)


def _not_found(call, some_id: str, placeholder: str) -> str:
    """The NOT_FOUND message of `call(some_id)`, the id in it replaced by `placeholder`."""
    with pytest.raises(NotFound) as err:
        call(some_id)
    return str(err.value).replace(some_id, placeholder)


def _watch_code(handle, token: str, run_id: str) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(handle.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        request = service_pb2.WatchRunRequest(run_id=run_id)
        with pytest.raises(grpc.RpcError) as err:
            for _ in stub.WatchRun(request, metadata=(("authorization", f"Bearer {token}"),)):
                pass
    return err.value.code(), err.value.details().replace(run_id, MISSING_RUN)


def test_another_tenant_cannot_see_watch_cancel_resume_or_delete_a_run(tenants):
    with _client(tenants, "alpha-token") as a, _client(tenants, "beta-token") as b:
        run = a.start_run(problems.rosenbrock(dim=2), np.zeros(2), **LONG)
        try:
            for call in (
                lambda rid: b.get_run(rid),
                lambda rid: b.cancel_run(rid),
                lambda rid: b.resume_run(rid),
                lambda rid: b.delete_run(rid),
            ):
                never = _not_found(call, MISSING_RUN, MISSING_RUN)
                assert _not_found(call, run.id, MISSING_RUN) == never
            watched = _watch_code(tenants, "beta-token", run.id)
            assert watched == _watch_code(tenants, "beta-token", MISSING_RUN)
            assert watched[0] == grpc.StatusCode.NOT_FOUND
            assert run.id not in {r.run_id for r in b.list_runs()}
            assert status_name(a.get_run(run.id)) in ("QUEUED", "RUNNING"), "B's cancel missed"
        finally:
            a.cancel_run(run.id)
        assert status_name(run.wait(60)) == "CANCELLED"


def test_list_runs_shows_only_the_callers_runs_and_an_admin_sees_all(tenants):
    quick = {"method": "gradient_descent", "stopping": {"max_iterations": 2}}
    with (
        _client(tenants, "alpha-token") as a,
        _client(tenants, "beta-token") as b,
        _client(tenants, "root-token") as root,
    ):
        mine_a = {a.start_run(problems.rosenbrock(dim=2), np.zeros(2), **quick).id for _ in "xy"}
        mine_b = {b.start_run(problems.rosenbrock(dim=2), np.zeros(2), **quick).id}
        for rid in mine_a:
            a.run(rid).wait(60)
        for rid in mine_b:
            b.run(rid).wait(60)
        listed_a = {r.run_id for r in a.list_runs()}
        listed_b = {r.run_id for r in b.list_runs()}
        assert mine_a <= listed_a and not listed_a & mine_b
        assert mine_b <= listed_b and not listed_b & mine_a
        assert mine_a | mine_b <= {r.run_id for r in root.list_runs()}
        victim = next(iter(mine_b))
        assert root.get_run(victim).run_id == victim
        assert root.delete_run(victim) is True
        with pytest.raises(NotFound):
            b.get_run(victim)


def test_an_admin_can_cancel_another_tenants_run(tenants):
    with _client(tenants, "alpha-token") as a, _client(tenants, "root-token") as root:
        run = a.start_run(problems.rosenbrock(dim=2), np.zeros(2), **LONG)
        root.cancel_run(run.id)
        assert status_name(run.wait(60)) == "CANCELLED"


def test_a_problem_by_id_is_only_the_owners_in_every_rpc_that_takes_one(tenants):
    problem = problems.quadratic(np.diag([1.0, 2.0, 3.0]), np.ones(3))
    with _client(tenants, "alpha-token") as a, _client(tenants, "beta-token") as b:
        pid = a.create_problem(problem)
        x = np.zeros(3)
        for call in (
            lambda p: b.gradient_step(p, x, learning_rate=0.1),
            lambda p: b.newton_step(p, x),
            lambda p: b.compute_hessian(p, x),
            lambda p: b.analyze_curvature(p, x),
            lambda p: b.start_run(p, x, stopping={"max_iterations": 2}),
            lambda p: b.delete_problem(p),
        ):
            never = _not_found(call, MISSING_PROBLEM, MISSING_PROBLEM)
            assert _not_found(call, pid, MISSING_PROBLEM) == never
        expected = np.linalg.solve(np.diag([1.0, 2.0, 3.0]), np.ones(3))  # one Newton step
        np.testing.assert_allclose(a.newton_step(pid, x).params, expected, rtol=1e-12)


def test_two_tenants_holding_the_same_problem_delete_their_own_hold_only(tenants):
    problem = problems.quadratic(np.diag([4.0, 5.0]), np.array([1.0, -1.0]))
    with (
        _client(tenants, "alpha-token") as a,
        _client(tenants, "beta-token") as b,
        _client(tenants, "root-token") as root,
    ):
        pid = a.create_problem(problem)
        assert b.create_problem(problem) == pid  # content-addressed: the same id
        assert b.delete_problem(pid) is True
        with pytest.raises(NotFound):
            b.newton_step(pid, np.zeros(2))
        with pytest.raises(NotFound):
            b.delete_problem(pid)
        expected = np.linalg.solve(np.diag([4.0, 5.0]), [1.0, -1.0])
        np.testing.assert_allclose(a.newton_step(pid, np.zeros(2)).params, expected, rtol=1e-12)
        np.testing.assert_allclose(root.newton_step(pid, np.zeros(2)).params, expected, rtol=1e-12)


def test_a_problem_a_live_run_uses_cannot_be_deleted(tenants):
    with _client(tenants, "alpha-token") as a:
        pid = a.create_problem(problems.rosenbrock(dim=3))
        run = a.start_run(pid, np.zeros(3), **LONG)
        with pytest.raises(FailedPrecondition, match=f"problem_id: problem {pid} is used by"):
            a.delete_problem(pid)
        a.cancel_run(run.id)
        run.wait(60)
        assert a.delete_problem(pid) is True
        with pytest.raises(NotFound):
            a.newton_step(pid, np.zeros(3))
        assert a.get_run(run.id).problem_id == pid  # the finished run keeps its records


def test_an_open_server_is_one_tenant_whatever_token_is_sent(tmp_path):
    """D8: made-up bearer tokens on a server without --auth-token-file share one quota."""
    handle = start_server(tmp_path, max_runs_per_token=1)
    try:
        with Client(handle.address, token="made-up-1") as x, Client(handle.address) as plain:
            run = x.start_run(problems.rosenbrock(dim=2), np.zeros(2), **LONG)
            try:
                with Client(handle.address, token="made-up-2") as y:
                    with pytest.raises(ResourceExhausted, match="max_runs_per_token"):
                        y.start_run(problems.rosenbrock(dim=2), np.zeros(2), **LONG)
                    assert y.get_run(run.id).run_id == run.id  # and they see each other's runs
                with pytest.raises(ResourceExhausted, match="max_runs_per_token"):
                    plain.start_run(problems.rosenbrock(dim=2), np.zeros(2), **LONG)
            finally:
                x.cancel_run(run.id)
            run.wait(60)
    finally:
        handle.stop(grace=1.0)


def test_admin_tokens_need_auth_tokens(tmp_path):
    (tmp_path / "admins").write_text("root-token\n")
    with pytest.raises(ValueError, match="--admin-token-file needs --auth-token-file"):
        start_server(tmp_path, admin_token_file=str(tmp_path / "admins"))


def test_an_admin_run_on_a_tenants_problem_keeps_it_when_the_tenant_deletes_it(tenants):
    problem = problems.quadratic(np.diag([2.0, 8.0]), np.array([2.0, 4.0]))
    with _client(tenants, "alpha-token") as a, _client(tenants, "root-token") as root:
        pid = a.create_problem(problem)
        run = root.start_run(pid, np.zeros(2), method="newton", stopping={"max_iterations": 3})
        run.wait(60)
        assert a.delete_problem(pid) is True  # alpha's hold goes; the admin's stays
        with pytest.raises(NotFound):
            a.newton_step(pid, np.zeros(2))
        np.testing.assert_allclose(root.newton_step(pid, np.zeros(2)).params, [1.0, 0.5])
        with pytest.raises(NotFound):
            a.get_run(run.id)  # the admin's run is the admin's


def test_an_admin_resuming_a_tenants_run_at_its_quota_is_told_whose_quota_it_is(tenants):
    """The run counts against the tenant it belongs to; the refusal said "this token already
    has 2 runs", to an admin whose token had none."""
    from hessian_client import InvalidArgument, minimize
    from scipy.optimize import rosen, rosen_der

    with pytest.raises(InvalidArgument) as err:  # a bad jac leaves the run INTERRUPTED
        minimize(rosen, np.zeros(3), jac=lambda x: "g", address=tenants.address,
                 token="alpha-token")  # fmt: skip
    with _client(tenants, "alpha-token") as a:
        runs = [a.start_run(problems.rosenbrock(dim=2), np.zeros(2), **LONG) for _ in range(2)]
        try:
            with pytest.raises(ResourceExhausted) as full:
                minimize(rosen, np.zeros(3), jac=rosen_der, resume=err.value.run_id,
                         address=tenants.address, token="root-token")  # fmt: skip
            assert "the token this run belongs to already has 2 runs" in str(full.value)
        finally:
            for run in runs:
                a.cancel_run(run.id)
                run.wait(60)
