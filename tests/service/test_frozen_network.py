"""A network that holds packets without closing the connection (a dead NAT entry, a frozen
peer): minimize() and a run's stream waited for ever. The channel now pings while a call is
open and fails it UNAVAILABLE when a ping goes unanswered; minimize's error names the run
and how to resume it. The SDK's keepalive is shortened here (30 s + 10 s in use) so that the
test takes seconds; the server's acceptance of the real one is checked on its own."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import start_server
from hessian_client import Client, Unavailable, minimize
from hessian_client import client as client_module
from hessian_service.server import app
from long_runs import start_endless_run
from scipy.optimize import rosen, rosen_der, rosen_hess
from tcp_proxy import TcpProxy
from waiting import ended_within


@pytest.fixture()
def quick_pings(monkeypatch):
    monkeypatch.setattr(client_module, "KEEPALIVE_MS", 500)
    monkeypatch.setattr(client_module, "KEEPALIVE_TIMEOUT_MS", 500)


@pytest.fixture()
def relayed(tmp_path):
    handle = start_server(tmp_path)
    proxy = TcpProxy(handle.address)
    yield handle, proxy
    proxy.close()
    handle.stop(grace=1.0)


def test_a_run_s_stream_over_a_frozen_network_fails_instead_of_waiting_for_ever(
    relayed, quick_pings
):
    handle, proxy = relayed
    with Client(handle.address, timeout=60) as direct, Client(proxy.address) as far:
        run = start_endless_run(direct)
        stream = far.run(run.id).stream(reconnect_timeout=2)  # then it gives up
        next(stream)
        proxy.frozen.set()
        start = time.monotonic()
        with pytest.raises(Unavailable):
            for _ in stream:
                pass
        assert time.monotonic() - start < 30  # a guard: it waited for ever before
        direct.cancel_run(run.id)


def test_minimize_over_a_frozen_network_raises_naming_the_run_to_resume(relayed, quick_pings):
    handle, proxy = relayed
    calls = []

    def fun(x):
        calls.append(1)
        if len(calls) == 4:
            proxy.frozen.set()  # the network stops while the caller evaluates
        return rosen(x)

    outcome = ended_within(
        lambda: minimize(fun, np.zeros(4), jac=rosen_der, hess=rosen_hess, address=proxy.address),
        60,
        "minimize",
    )
    error = outcome["error"]
    assert isinstance(error, Unavailable) and error.run_id.startswith("r-")
    assert f"resume={error.run_id!r} continues it" in "\n".join(error.__notes__)
    proxy.frozen.clear()
    with Client(handle.address, timeout=60) as direct:  # the server let go of it: resumable
        deadline = time.monotonic() + 60
        while direct.get_run(error.run_id).status != "INTERRUPTED":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    resumed = minimize(rosen, np.zeros(4), jac=rosen_der, hess=rosen_hess,
                       address=handle.address, resume=error.run_id)  # fmt: skip
    np.testing.assert_allclose(resumed.x, np.ones(4), atol=1e-8)


def test_a_quiet_call_pinged_as_often_as_the_server_allows_is_not_ended(tmp_path, monkeypatch):
    # the server's allowance is passed to gRPC under the name it reads (a misspelt one
    # left gRPC's one ping in 5 minutes: a call quiet for three pings ended UNAVAILABLE
    # "Too many pings"); the SDK's real pace is 30 s against the server's 10 s, scaled here
    monkeypatch.setattr(app, "MIN_CLIENT_PING_MS", 200)
    monkeypatch.setattr(client_module, "KEEPALIVE_MS", 1000)
    monkeypatch.setattr(client_module, "KEEPALIVE_TIMEOUT_MS", 2000)
    assert app.MIN_CLIENT_PING_MS <= client_module.KEEPALIVE_MS
    handle = start_server(tmp_path)
    calls = []

    def slow_once(x):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(6.0)  # pings with nothing else on the connection
        return rosen(x)

    try:
        res = minimize(slow_once, np.zeros(3), jac=rosen_der, hess=rosen_hess,
                       address=handle.address)  # fmt: skip
        np.testing.assert_allclose(res.x, np.ones(3), atol=1e-8)
    finally:
        handle.stop(grace=1.0)


def test_hessian_keepalive_0_turns_the_pings_off(monkeypatch):
    # a server before the keepalive allowance ends a call pinged every 30 s after 5 quiet
    # minutes: HESSIAN_KEEPALIVE=0 sends none to it
    names = {name for name, _ in client_module.channel_options(1 << 20)}
    assert "grpc.keepalive_time_ms" in names
    monkeypatch.setenv("HESSIAN_KEEPALIVE", "0")
    names = {name for name, _ in client_module.channel_options(1 << 20)}
    assert not any("keepalive" in name or "ping" in name for name in names)
