"""Every SDK call takes `timeout=` for itself (create_problem, info, get_run, ... had none:
one slow upload could only be bounded by the whole client's timeout), in the sync and the
asyncio client, with the client's own range check and field name.

A deadline is shown to apply by a server that never answers: a listening socket that
completes TCP connections and says nothing, so every call waits until its deadline."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
from hessian_client import Client, DeadlineExceeded, InvalidArgument, aio, problems

PID, RID = "p-" + "0" * 64, "r-" + "0" * 32


def _calls(c: Client) -> dict:
    """Each call of the SDK that sends one request, taking `timeout` as its free argument."""
    return {
        "info": lambda t: c.info(timeout=t),
        "create_problem": lambda t: c.create_problem(problems.rosenbrock(dim=3), timeout=t),
        "sample": lambda t: c.sample(0, [[2]], timeout=t),
        "start_run": lambda t: c.start_run(PID, np.zeros(3), timeout=t),
        "start_run(watch)": lambda t: c.start_run(PID, np.zeros(3), watch=True, timeout=t),
        "get_run": lambda t: c.get_run(RID, timeout=t),
        "list_runs": lambda t: next(iter(c.list_runs(timeout=t))),
        "cancel_run": lambda t: c.cancel_run(RID, timeout=t),
        "resume_run": lambda t: c.resume_run(RID, timeout=t),
        "delete_run": lambda t: c.delete_run(RID, timeout=t),
        "delete_problem": lambda t: c.delete_problem(PID, timeout=t),
        "Run.cancel": lambda t: c.run(RID).cancel(timeout=t),
        "Run.info": lambda t: c.run(RID).info(timeout=t),
    }


NAMES = list(_calls(None))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def silent():
    """The address of a server that accepts connections and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def _elapsed_until_deadline(call, timeout) -> float:
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        call(timeout)
    return time.monotonic() - start


@pytest.mark.parametrize("name", NAMES)
def test_a_call_s_own_timeout_bounds_it(silent, name):
    with Client(silent, timeout=600) as client:
        # the client's 600 s would hold it ten minutes; its own 0.3 s ends it (30: a guard)
        assert _elapsed_until_deadline(_calls(client)[name], 0.3) < 30


@pytest.mark.parametrize("name", NAMES)
def test_a_call_s_own_timeout_replaces_the_client_s(silent, name):
    with Client(silent, timeout=0.1) as client:
        # a longer deadline of its own: it waits that long, not the client's 0.1 s
        assert _elapsed_until_deadline(_calls(client)[name], 1.0) >= 0.95


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), 1e30, "soon"])
def test_a_bad_call_timeout_is_refused_under_its_name(silent, name, bad):
    with Client(silent, timeout=0.1) as client, pytest.raises(InvalidArgument) as err:
        _calls(client)[name](bad)
    assert err.value.field == "timeout"


def test_the_asyncio_client_s_calls_take_a_timeout_too(silent, server):
    async def main() -> None:
        async with aio.Client(silent, timeout=600) as quiet:
            for call in (
                quiet.create_problem(problems.rosenbrock(dim=3), timeout=0.3),
                quiet.get_run(RID, timeout=0.3),
                quiet.start_run(PID, np.zeros(3), watch=True, timeout=0.3),
                anext(quiet.list_runs(timeout=0.3)),
                quiet.run(RID).info(timeout=0.3),
                quiet.run(RID).cancel(timeout=0.3),
            ):
                start = time.monotonic()
                with pytest.raises(DeadlineExceeded):
                    await call
                assert time.monotonic() - start < 30
            with pytest.raises(InvalidArgument) as err:
                await quiet.delete_problem(PID, timeout=-1)
            assert err.value.field == "timeout"
        async with aio.Client(server.address, timeout=60) as ac:  # None: no deadline at all
            pid = await ac.create_problem(problems.rosenbrock(dim=3), timeout=None)
            run = await ac.start_run(pid, np.zeros(3), stopping={"max_iterations": 2},
                                     watch=True, timeout=None)  # fmt: skip
            assert [r.iteration async for r in run.stream()] == [0, 1, 2]

    asyncio.run(main())
