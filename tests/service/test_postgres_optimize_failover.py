"""An Optimize run (the caller evaluates) on a shared PostgreSQL store whose replica dies or
drains: its caller's stream was on that replica, so no other can continue it. It must not
stay RUNNING (the survivors tried to take it over every T/8 and failed, and a drain "handed
it over" to nobody): it becomes INTERRUPTED, and minimize(resume=run_id) on a survivor
finishes it with the records of an uninterrupted run."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
from conftest import free_port, spawn_server
from hessian_client import Client, HessianError, minimize
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401
from scipy.optimize import rosen, rosen_der, rosen_hess

LEASE_S = 2.0
X0 = np.array([-1.2, 1.0, 0.8, -0.5])


def _records(address: str, run_id: str) -> list[tuple[int, float, bool]]:
    with Client(address) as c:
        return [(r.iteration, r.loss, r.step_accepted) for r in c.run(run_id).records()]


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_an_optimize_run_whose_replica_stops_is_interrupted_and_resumable(
    tmp_path, postgres_dsn, stop
):
    ports = [free_port(), free_port()]
    a, b = (f"127.0.0.1:{p}" for p in ports)
    flags = ("--store", postgres_dsn, "--lease-seconds", str(LEASE_S), "--grace-seconds", "1")
    procs = [spawn_server(tmp_path / f"r{i}", p, *flags) for i, p in enumerate(ports)]
    try:
        calls, blocked, raised = [0], threading.Event(), []

        def fun(x):  # answers 5 evaluations, then waits while its replica goes away
            calls[0] += 1
            if calls[0] == 6:
                blocked.set()
                time.sleep(3 * LEASE_S)
            return rosen(x)

        def caller() -> None:
            try:
                minimize(fun, X0, jac=rosen_der, hess=rosen_hess, address=a)
            except HessianError as exc:
                raised.append(exc)

        thread = threading.Thread(target=caller, daemon=True)
        thread.start()
        assert blocked.wait(60)
        procs[0].send_signal(stop)
        procs[0].wait(30)
        thread.join(60)
        assert raised and raised[0].run_id, raised  # the broken stream names the run
        run_id = raised[0].run_id
        deadline = time.monotonic() + 30 * LEASE_S  # guards a hang only
        with Client(b) as c:
            while (info := c.get_run(run_id)).status != "INTERRUPTED":
                assert info.status == "RUNNING" and time.monotonic() < deadline, info
                time.sleep(0.05)
        res = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, resume=run_id, address=b)
        plain = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, address=b)
        assert res.run_status == "FINISHED" and np.array_equal(res.x, plain.x)
        assert _records(b, run_id) == _records(b, plain.run_id)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
