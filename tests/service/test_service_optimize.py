"""Optimize against a real server process: a caller cut off through a TCP relay (twice)
resumes to the records of an uninterrupted run; bad replies fail the run naming the field;
a slow caller leaves it INTERRUPTED (resumable), not stuck; CancelRun from another client
ends it; the per-token stream limit holds; WatchRun and GetRun see the run like any other."""

from __future__ import annotations

import queue
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from conftest import free_port, spawn_server
from hessian_client import Client, HessianError, least_squares, minimize, problems, tensors
from hessian_client.proto import optimize_pb2, service_pb2
from optimize_stream import HANG_GUARD, Stream
from scipy.optimize import rosen, rosen_der, rosen_hess
from tcp_proxy import TcpProxy

# The module server's per-evaluation deadline: long, so a caller that waits on purpose (the
# cancel and stream-limit tests) is never cut off by it on a loaded machine; only the slow-caller
# test, on a server of its own, has a short one (SLOW_CALLER_SECONDS) that it waits out.
EVALUATION_SECONDS = 120
SLOW_CALLER_SECONDS = 3
X0 = np.array([-1.2, 1.0, 0.8, 1.4, -0.5, 0.9])
RECORD_FIELDS = ("iteration", "loss", "gradient_norm", "step_norm", "step_size", "damping")


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    port = free_port()
    proc = spawn_server(
        tmp_path_factory.mktemp("optimize"),
        port,
        "--optimize-evaluation-seconds",
        str(EVALUATION_SECONDS),
        "--max-optimize-streams-per-token",
        "2",
        "--commit-interval-ms",
        "20",
    )
    yield f"127.0.0.1:{port}"
    proc.kill()
    proc.wait(timeout=60)


def start_request(**capabilities) -> service_pb2.OptimizeRequest:
    caps = capabilities or {"gradient": True, "hessian": True}
    return service_pb2.OptimizeRequest(
        start=service_pb2.OptimizeStart(
            initial_params=tensors.encode(X0), capabilities=service_pb2.Capabilities(**caps)
        )
    )


def good_values(ask) -> service_pb2.Evaluation:
    x = tensors.decode(ask.point)
    return service_pb2.Evaluation(
        request_id=ask.request_id,
        loss=rosen(x),
        gradient=tensors.encode(rosen_der(x)),
        hessian=tensors.encode(rosen_hess(x)),
    )


def rosen_residuals(x):
    """Rosenbrock as residuals: 0.5 ||r||^2 = rosen(x) / 2."""
    return np.concatenate([10.0 * (x[1:] - x[:-1] ** 2), 1.0 - x[:-1]])


def rosen_jacobian(x):
    n, i = x.size, np.arange(x.size - 1)
    j = np.zeros((2 * (n - 1), n))
    j[i, i], j[i, i + 1], j[n - 1 + i, i] = -20.0 * x[:-1], 10.0, -1.0
    return j


def record_tuples(address: str, run_id: str) -> list[tuple]:
    with Client(address) as client:
        records = client.run(run_id).records()
    return [tuple(getattr(r, f) for f in RECORD_FIELDS) for r in records]


def settled_info(address: str, run_id: str, status: str):
    """The run's info once the server has stored `status` (it sees a broken stream a moment
    after the caller does); a 60 s guard against a hang."""
    deadline = time.monotonic() + 60
    with Client(address) as client:
        while (info := client.get_run(run_id)).status != status and time.monotonic() < deadline:
            time.sleep(0.02)
    return info


def test_relay_cut_twice_resumes_to_the_uninterrupted_records(address):
    plain = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, method="newton", address=address)
    proxy = TcpProxy(address)
    calls = {"n": 0}
    third = plain.nfev // 3
    cut_at = {third, 2 * third}  # loss evaluations at which the relay drops every connection

    def fun(x):
        calls["n"] += 1
        if calls["n"] in cut_at:
            proxy.sever()
        return rosen(x)

    run_id, cuts = None, 0
    try:
        for _attempt in range(3):
            try:
                res = minimize(fun, X0, jac=rosen_der, hess=rosen_hess, method="newton",
                               address=proxy.address, resume=run_id)  # fmt: skip
                break
            except HessianError as exc:
                assert exc.run_id, "a broken stream names its run"
                cuts += 1
                run_id = exc.run_id
                assert settled_info(address, run_id, "INTERRUPTED").status == "INTERRUPTED"
        else:
            raise AssertionError("three streams did not finish the run")
    finally:
        proxy.close()
    assert run_id is not None and res.run_id == run_id  # cut twice, the same run resumed
    assert cuts == 2 and plain.nfev > 6
    assert record_tuples(address, run_id) == record_tuples(address, plain.run_id)
    np.testing.assert_array_equal(res.x, plain.x)
    assert res.run_status == "FINISHED" and res.success


@pytest.mark.parametrize("fault", ["raises", "bad_jac_shape"])
def test_an_error_on_the_callers_side_names_the_run_it_leaves_resumable(address, fault):
    # the caller's function raising, or a gradient the SDK refuses before sending, broke the
    # stream with an error that had no run_id: the INTERRUPTED run could not be found
    plain = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, method="newton", address=address)
    calls = {"n": 0}

    def jac(x):
        calls["n"] += 1
        if calls["n"] == 4:
            if fault == "raises":
                raise ZeroDivisionError("the caller's own bug")
            return rosen_der(x)[:-1]
        return rosen_der(x)

    expected = ZeroDivisionError if fault == "raises" else HessianError
    with pytest.raises(expected) as err:
        minimize(rosen, X0, jac=jac, hess=rosen_hess, method="newton", address=address)
    run_id = err.value.run_id
    assert run_id and any(run_id in note for note in err.value.__notes__)
    assert settled_info(address, run_id, "INTERRUPTED").status == "INTERRUPTED"
    res = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, method="newton",
                   address=address, resume=run_id)  # fmt: skip
    assert res.run_id == run_id and res.run_status == "FINISHED"
    np.testing.assert_array_equal(res.x, plain.x)


def _broken_run(address: str, error: type[BaseException]) -> str:
    """A newton minimize() run with hess whose jac raises `error` at its 4th call: the
    stream breaks, the run is INTERRUPTED; returns its id (which the error carries)."""
    calls = {"n": 0}

    def jac(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise error("stopped by the caller")
        return rosen_der(x)

    with pytest.raises(error) as err:
        minimize(rosen, X0, jac=jac, hess=rosen_hess, method="newton", address=address)
    run_id = err.value.run_id
    assert run_id and any(f"resume={run_id!r}" in note for note in err.value.__notes__)
    assert settled_info(address, run_id, "INTERRUPTED").status == "INTERRUPTED"
    return run_id


def test_ctrl_c_in_the_callers_function_names_the_run_it_leaves_resumable(address):
    """A KeyboardInterrupt (not an Exception) left the run INTERRUPTED with no run_id."""
    plain = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, method="newton", address=address)
    run_id = _broken_run(address, KeyboardInterrupt)
    res = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, address=address, resume=run_id)
    assert res.run_id == run_id and res.run_status == "FINISHED"
    np.testing.assert_array_equal(res.x, plain.x)


def rosen_hess_prod(x, v):
    return rosen_hess(x) @ v


@pytest.mark.parametrize(
    "resume",
    [
        lambda a, r: least_squares(lambda x: x, X0, lambda x: np.eye(6), address=a, resume=r),
        lambda a, r: minimize(rosen, X0, jac=rosen_der, hessp=rosen_hess_prod, address=a, resume=r),
    ],
    ids=["least_squares", "hessp-for-hess"],
)
def test_a_resume_without_the_runs_derivatives_is_refused_and_the_run_kept(address, resume):
    """Resuming a minimize(hess=...) run from least_squares (Gauss-Newton products) or with
    hessp: the server asked for a Hessian the caller could not give, and failed the run for
    good (FAILED; or a bare TypeError on the caller's side). Now refused before any work,
    naming what is missing; the run stays INTERRUPTED and the right caller finishes it."""
    run_id = _broken_run(address, ZeroDivisionError)
    with pytest.raises(HessianError) as refused:
        resume(address, run_id)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.field == "resume"  # the argument (the wire: resume_capabilities)
    assert "lacks hessian" in refused.value.message
    assert settled_info(address, run_id, "INTERRUPTED").status == "INTERRUPTED"
    res = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, address=address, resume=run_id)
    assert res.run_id == run_id and res.run_status == "FINISHED" and res.success


def test_a_cut_least_squares_run_resumes_with_its_gauss_newton_products(address):
    """A gauss_newton_cg run cut mid-run through the relay resumes under the same id (its
    Gauss-Newton capability restored from the stored declaration) to the records of an
    uninterrupted run."""
    x0 = np.random.default_rng(torch.initial_seed()).uniform(0.2, 1.8, 6)
    lsq = {"method": "gauss_newton_cg", "gtol": 1e-10, "xtol": 1e-15}
    plain = least_squares(rosen_residuals, x0, rosen_jacobian, address=address, **lsq)
    proxy = TcpProxy(address)
    calls = {"n": 0}

    def jac(x):
        calls["n"] += 1
        if calls["n"] == plain.njev // 2:
            proxy.sever()
        return rosen_jacobian(x)

    run_id = None
    try:
        with pytest.raises(HessianError) as cut:
            least_squares(rosen_residuals, x0, jac, address=proxy.address, **lsq)
        run_id = cut.value.run_id
        assert settled_info(address, run_id, "INTERRUPTED").status == "INTERRUPTED"
        res = least_squares(rosen_residuals, x0, jac, address=proxy.address, resume=run_id, **lsq)
    finally:
        proxy.close()
    assert res.run_id == run_id and res.run_status == "FINISHED" and plain.njev > 4
    assert record_tuples(address, run_id) == record_tuples(address, plain.run_id)
    np.testing.assert_array_equal(res.x, plain.x)


@pytest.mark.parametrize(
    ("spoil", "field"),
    [
        (lambda e: e.ClearField("gradient"), "evaluation.gradient"),
        (lambda e: e.gradient.CopyFrom(tensors.encode(np.zeros(3))), "evaluation.gradient"),
        (
            lambda e: e.hessian.CopyFrom(tensors.encode(np.full((6, 6), np.nan))),
            "evaluation.hessian",
        ),
        (lambda e: e.ClearField("loss"), "evaluation.loss"),
        (lambda e: setattr(e, "request_id", e.request_id + 7), "evaluation.request_id"),
    ],
)
def test_a_bad_reply_fails_the_run_naming_the_field(address, spoil, field):
    # good answers up to the next point's ask (a line-search trial asks the loss only)
    def next_points_ask(ask, n):
        return n > 0 and ask.gradient

    assert_spoiled_reply_fails_the_run(
        address, start_request(), good_values, next_points_ask, spoil, field
    )


def assert_spoiled_reply_fails_the_run(address, first, answer, target, spoil, field) -> None:
    """Answer each ask with `answer` up to the first that `target(ask, n)` picks (n: asks
    answered so far), then send its answer spoiled: the run FAILS naming `field`."""
    stream = Stream(address, first)
    try:
        run_id = stream.read().started.run_id
        ask, n = stream.read().evaluate, 0
        while not target(ask, n):
            stream.send(evaluation=answer(ask))
            ask, n = stream.read().evaluate, n + 1
        values = answer(ask)
        spoil(values)
        stream.send(evaluation=values)
        info = stream.finish()
    finally:
        stream.close()
    assert info.status == service_pb2.RUN_STATUS_FAILED, info.message
    assert field in info.message and "internal" not in info.message.lower()
    assert settled_info(address, run_id, "FAILED").status == "FAILED"


def gauss_newton_values(ask) -> service_pb2.Evaluation:
    """Rosenbrock as residuals r (0.5 ||r||^2 = rosen / 2): loss, J^T r and J^T J v."""
    x = tensors.decode(ask.point)
    r, j = rosen_residuals(x), rosen_jacobian(x)
    out = service_pb2.Evaluation(request_id=ask.request_id)
    if ask.loss or ask.gradient:
        out.loss = 0.5 * float(r @ r)
    if ask.gradient:
        out.gradient.CopyFrom(tensors.encode(j.T @ r))
    if ask.HasField("gn_vectors"):
        vectors = tensors.decode(ask.gn_vectors)
        out.gn_products.CopyFrom(tensors.encode((j.T @ (j @ vectors.T)).T))
    return out


@pytest.mark.parametrize(
    ("spoil", "field"),
    [
        (lambda e: e.ClearField("gn_products"), "evaluation.gn_products"),
        (lambda e: e.gn_products.CopyFrom(tensors.encode(np.zeros(5))), "evaluation.gn_products"),
        (
            lambda e: e.gn_products.CopyFrom(tensors.encode(np.full((1, 6), np.inf))),
            "evaluation.gn_products",
        ),
    ],
)
def test_a_bad_gauss_newton_reply_fails_the_run_naming_the_field(address, spoil, field):
    first = start_request(gradient=True, gauss_newton=True)
    first.start.options.method = optimize_pb2.METHOD_GAUSS_NEWTON_CG

    def first_cg_product(ask, n):  # good answers up to the first CG product
        return ask.HasField("gn_vectors")

    assert_spoiled_reply_fails_the_run(
        address, first, gauss_newton_values, first_cg_product, spoil, field
    )


def test_gauss_newton_cg_over_the_stream_reaches_the_minimum(address):
    """A raw caller answering J^T J v products drives gauss_newton_cg to Rosenbrock's
    minimum (cost 0: the residuals vanish at x = 1), the run FINISHED and converged."""
    first = start_request(gradient=True, gauss_newton=True)
    first.start.options.method = optimize_pb2.METHOD_GAUSS_NEWTON_CG
    x0 = np.random.default_rng(torch.initial_seed()).uniform(0.2, 1.8, 6)  # in the minimum's basin
    first.start.initial_params.CopyFrom(tensors.encode(x0))
    first.start.stopping.max_iterations = 500
    first.start.stopping.parameter_tolerance = 1e-15
    first.start.stopping.gradient_tolerance = 1e-9
    stream = Stream(address, first)
    try:
        stream.read()
        while (response := stream.read()).WhichOneof("kind") == "evaluate":
            stream.send(evaluation=gauss_newton_values(response.evaluate))
        info = response.finished
    finally:
        stream.close()
    assert info.status == service_pb2.RUN_STATUS_FINISHED and info.converged, info.message
    np.testing.assert_allclose(tensors.decode(info.final_params), np.ones(6), atol=1e-8)
    assert info.last_record.loss <= 1e-10


def test_a_slow_caller_leaves_the_run_interrupted_and_resumable(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = spawn_server(
        tmp_path, port, "--optimize-evaluation-seconds", str(SLOW_CALLER_SECONDS),
        "--commit-interval-ms", "20",
    )  # fmt: skip
    try:
        stream = Stream(address, start_request())
        try:
            run_id = stream.read().started.run_id
            stream.send(evaluation=good_values(stream.read().evaluate))
            assert stream.read().WhichOneof("kind") == "evaluate"  # never answered
            info = stream.finish()  # the server gives up after SLOW_CALLER_SECONDS
        finally:
            stream.close()
        assert info.status == service_pb2.RUN_STATUS_INTERRUPTED
        assert "deadline" in info.message
        res = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, resume=run_id, address=address)
        plain = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, address=address)
        assert res.run_id == run_id and res.run_status == "FINISHED"
        np.testing.assert_array_equal(res.x, plain.x)  # as if never interrupted
        assert record_tuples(address, run_id) == record_tuples(address, plain.run_id)
        # minimize() and least_squares() past the deadline raise, with the run to resume
        # (they returned a result, status 2, whose x was a later point than its fun's)
        calls = [0]

        def late(x):
            calls[0] += 1
            if calls[0] == 4:
                time.sleep(SLOW_CALLER_SECONDS + 2)
            return rosen(x)

        with pytest.raises(HessianError) as err:
            minimize(late, X0, jac=rosen_der, hess=rosen_hess, address=address)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.value.run_id and f"resume={err.value.run_id!r}" in "".join(err.value.__notes__)
        resumed = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, resume=err.value.run_id,
                           address=address)  # fmt: skip
        np.testing.assert_array_equal(resumed.x, plain.x)
        calls[0] = 0
        with pytest.raises(HessianError) as err:
            least_squares(lambda x: late(x) * 0 + (x - 1.0), X0, lambda x: np.eye(len(x)),
                          address=address)  # fmt: skip
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.run_id
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_cancel_run_from_another_client_ends_a_waiting_stream(address):
    stream = Stream(address, start_request())
    try:
        run_id = stream.read().started.run_id
        assert stream.read().WhichOneof("kind") == "evaluate"
        with Client(address) as other:
            assert other.get_run(run_id).status == "RUNNING"
            other.cancel_run(run_id)
        info = stream.finish()
    finally:
        stream.close()
    assert info.status == service_pb2.RUN_STATUS_CANCELLED
    assert settled_info(address, run_id, "CANCELLED").status == "CANCELLED"


def test_stream_count_per_token_is_limited(address):
    first = Stream(address, start_request())
    second = Stream(address, start_request())
    try:
        first.read(), second.read()  # both started (the limit is 2)
        third = Stream(address, start_request())
        with pytest.raises(grpc.RpcError) as err:
            third.read()
        third.close()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_optimize_streams_per_token" in err.value.details()
    finally:
        first.close()
        second.close()


def test_watchers_see_the_records_live(address):
    stream = Stream(address, start_request())
    watched: list = []
    try:
        run_id = stream.read().started.run_id
        with Client(address) as other:
            watcher = threading.Thread(
                target=lambda: watched.extend(other.run(run_id).stream()), daemon=True
            )
            watcher.start()
            own = []
            while True:
                response = stream.read()
                own.extend(response.records)
                if response.WhichOneof("kind") == "finished":
                    break
                stream.send(evaluation=good_values(response.evaluate))
            watcher.join(HANG_GUARD)
    finally:
        stream.close()
    assert [r.loss for r in watched] == [r.loss for r in own]
    assert len(own) == response.finished.last_record.iteration + 1
    assert response.finished.status == service_pb2.RUN_STATUS_FINISHED


def test_resume_run_refuses_an_optimize_run_naming_the_way(address):
    stream = Stream(address, start_request())
    try:
        run_id = stream.read().started.run_id
        stream.close()  # the caller goes away: INTERRUPTED
    finally:
        stream.close()
    with Client(address) as client:
        for _ in range(HANG_GUARD * 10):
            if client.get_run(run_id).status == "INTERRUPTED":
                break
            time.sleep(0.1)
        with pytest.raises(HessianError, match="resume_run_id") as err:
            client.resume_run(run_id)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        # a finished one is refused as any finished run is, not pointed at Optimize
        done = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, address=address)
        with pytest.raises(HessianError) as err:
            client.resume_run(done.run_id)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.message.endswith(f"run {done.run_id} is FINISHED, not INTERRUPTED")


def test_a_reply_to_nothing_pending_fails_the_run(address):
    """The same evaluation twice: the second answers a request no longer pending (whether
    or not the next one was asked yet), which fails the run naming evaluation.request_id."""
    stream = Stream(address, start_request())
    try:
        run_id = stream.read().started.run_id
        values = good_values(stream.read().evaluate)
        stream.send(evaluation=values)
        stream.send(evaluation=values)
        info = stream.finish()
    finally:
        stream.close()
    assert info.status == service_pb2.RUN_STATUS_FAILED, info.message
    assert "evaluation.request_id" in info.message
    assert settled_info(address, run_id, "FAILED").status == "FAILED"


def test_garbage_bytes_mid_run_fail_the_run_not_internal(address):
    """Raw bytes (identity serializers): a valid start, then a truncated varint tag."""
    outgoing: queue.Queue = queue.Queue()
    outgoing.put(start_request().SerializeToString())
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream("/hessian.v1.HessianService/Optimize")(
            iter(outgoing.get, None), timeout=HANG_GUARD
        )
        responses = (service_pb2.OptimizeResponse.FromString(raw) for raw in call)
        run_id = next(responses).started.run_id
        assert next(responses).WhichOneof("kind") == "evaluate"
        outgoing.put(b"\xff\xff\xff\xff\x0f")
        last = list(responses)[-1]
        outgoing.put(None)
    assert last.finished.status == service_pb2.RUN_STATUS_FAILED
    assert last.finished.message.startswith("request: expected an OptimizeRequest message")
    assert settled_info(address, run_id, "FAILED").status == "FAILED"


def test_server_killed_mid_run_then_restarted_resumes_to_the_same_records(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = spawn_server(tmp_path, port)
    try:
        plain = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, address=address)
        calls = {"n": 0}

        def fun(x):
            calls["n"] += 1
            if calls["n"] == plain.nfev // 2:
                proc.kill()  # SIGKILL: no shutdown, no final write
                proc.wait(timeout=60)
            return rosen(x)

        with pytest.raises(HessianError) as err:
            minimize(fun, X0, jac=rosen_der, hess=rosen_hess, address=address)
        run_id = err.value.run_id
        assert run_id
        proc = spawn_server(tmp_path, port)
        assert settled_info(address, run_id, "INTERRUPTED").status == "INTERRUPTED"
        res = minimize(rosen, X0, jac=rosen_der, hess=rosen_hess, resume=run_id, address=address)
        assert res.run_status == "FINISHED"
        np.testing.assert_array_equal(res.x, plain.x)
        assert record_tuples(address, run_id) == record_tuples(address, plain.run_id)
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_a_waiting_optimize_run_holds_no_pool_worker_and_has_its_own_limit(tmp_path):
    """--workers 1: while an Optimize run waits for its caller, a catalogue run still gets
    the one pool worker and finishes (the Optimize run still RUNNING, not interrupted); a
    second Optimize run is refused RESOURCE_EXHAUSTED naming --max-optimize-runs."""
    port = free_port()
    proc = spawn_server(
        tmp_path, port, "--workers", "1", "--max-optimize-runs", "1",
        "--optimize-evaluation-seconds", "120",
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    stream = Stream(address, start_request())
    try:
        run_id = stream.read().started.run_id
        ask = stream.read().evaluate  # the run now waits for this caller
        with Client(address) as client:
            plain = client.start_run(
                problems.rosenbrock(dim=3), np.zeros(3), stopping={"max_iterations": 20}
            )
            assert plain.wait(60).status == "FINISHED"
            assert client.get_run(run_id).status == "RUNNING"
        refused = Stream(address, start_request()).refusal()
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_optimize_runs" in refused.details()
        stream.send(evaluation=good_values(ask))
        while (response := stream.read()).WhichOneof("kind") == "evaluate":
            stream.send(evaluation=good_values(response.evaluate))
        assert response.finished.status == service_pb2.RUN_STATUS_FINISHED
    finally:
        stream.close()
        proc.kill()
        proc.wait(timeout=60)


def test_a_run_a_shutdown_stops_says_how_the_caller_resumes_it(tmp_path):
    """SIGTERM while an Optimize run waits for its caller: the run is INTERRUPTED, and its
    message says Optimize's resume_run_id continues it (it said only that the call was
    cancelled; elsewhere such messages named ResumeRun, which refuses Optimize runs)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = spawn_server(tmp_path, port)
    stream = Stream(address, start_request())
    try:
        run_id = stream.read().started.run_id
        assert stream.read().WhichOneof("kind") == "evaluate"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        stream.close()
    proc = spawn_server(tmp_path, port)
    try:
        info = settled_info(address, run_id, "INTERRUPTED")
        assert info.stop_reason == "shutdown"
        assert "Optimize's resume_run_id" in info.message and "ResumeRun" not in info.message
    finally:
        proc.kill()
        proc.wait(timeout=60)
