"""GetServerInfo reports every limit the server enforces, each equal to the configured value, and
a request over each limit is refused with the limit's field named (the CLI shows them all)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import occupy_workers, start_server
from google.protobuf import json_format
from hessian_client import (
    Client,
    InvalidArgument,
    ResourceExhausted,
    ServerInfo,
    ServerLimits,
    problems,
)
from hessian_client.cli import main
from hessian_service.server.service import SAMPLE_HEADER_BYTES

MiB = 1024**2
CONFIG = {
    "max_message_bytes": 4 * MiB,
    "max_params": 3000,
    "dense_budget_bytes": MiB,
    "max_iterations": 500,
    "max_concurrent_runs": 3,
    "workers": 1,
    "max_data_bytes": 8000,
    "max_runs_per_token": 2,
    "max_stored_runs": 40,
    "max_store_bytes": 64 * MiB,
}
SAMPLE_ELEMENTS = (4 * MiB - SAMPLE_HEADER_BYTES) // 8  # float64 values, room for the headers
LONG = {"method": "gradient_descent", "learning_rate": 1e-6, "stopping": {"max_iterations": 500}}


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("info")
    (tmp / "tokens").write_text("alpha-token\nbeta-token\n")
    handle = start_server(tmp / "data", auth_token_file=str(tmp / "tokens"), **CONFIG)
    yield handle
    handle.stop(grace=1.0)


def _client(handle, token: str = "alpha-token") -> Client:
    return Client(handle.address, token=token, timeout=30)


def test_every_limit_is_reported_as_configured(limited):
    with _client(limited) as c:
        limits = c.info().limits
    for name, value in CONFIG.items():
        assert getattr(limits, name) == value, name
    assert limits.max_spectrum_products == 100_000
    assert limits.max_list_page_size == 1000
    assert limits.max_sample_elements == SAMPLE_ELEMENTS


def test_info_is_typed_data_with_every_wire_field_and_the_cli_json_gives_them(limited, capsys):
    with _client(limited) as c:
        info = c.info()
    assert isinstance(info, ServerInfo) and isinstance(info.limits, ServerLimits)
    wire = info.raw
    assert [f.name for f in dataclasses.fields(ServerLimits)] == [
        f.name for f in wire.limits.DESCRIPTOR.fields
    ]
    for f in wire.DESCRIPTOR.fields:
        value = getattr(info, f.name)
        if f.name == "limits":
            for g in wire.limits.DESCRIPTOR.fields:
                assert getattr(value, g.name) == getattr(wire.limits, g.name), g.name
        else:
            assert value == (
                list(getattr(wire, f.name)) if f.is_repeated else getattr(wire, f.name)
            )
    assert info.limits.max_params == CONFIG["max_params"] and "newton" in info.methods
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.version = "x"
    assert main(["--address", limited.address, "--token", "alpha-token", "info", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == json_format.MessageToDict(
        wire, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    ) | {"limits": {k: int(v) for k, v in json_format.MessageToDict(
        wire.limits, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    ).items()}}  # fmt: skip


def test_the_cli_shows_every_limit(limited, capsys):
    code = main(["--address", limited.address, "--token", "alpha-token", "info"])
    out = capsys.readouterr().out
    assert code == 0
    for text in (
        f"message {4 * MiB} B",
        "params 3000",
        f"dense Hessian {MiB} B",
        "iterations 500",
        "concurrent runs 3",
        "workers 1",
        "data 8000 B per problem",
        "runs per token 2",
        "stored runs 40",
        f"store {64 * MiB} B",
        "curvature products 100000 per call",
        "ListRuns page 1000",
        f"sampled values {SAMPLE_ELEMENTS} per call",
    ):
        assert text in out, text


def test_a_request_over_each_reported_limit_is_refused_naming_the_field(limited):
    with _client(limited) as c:
        limits = c.info().limits
        n = limits.max_params
        with pytest.raises(ResourceExhausted, match=rf"params\.shape.*{n}"):
            c.newton_step(problems.mse(np.ones(3)), np.zeros(n + 1))
        with pytest.raises(ResourceExhausted, match=rf"problem\.data.*{limits.max_data_bytes}"):
            c.create_problem(problems.mse(np.ones(limits.max_data_bytes // 8 + 1)))
        big = problems.rosenbrock(dim=400)  # a 400x400 float64 Hessian: 1.2 MiB > 1 MiB
        with pytest.raises(ResourceExhausted, match=r"options\.dense_budget_bytes"):
            c.start_run(big, np.zeros(400), method="newton")
        side = 800  # an 800x800 float64 matrix: 4.9 MiB, over the 4 MiB message limit
        with pytest.raises(ResourceExhausted, match=rf"omit_matrix.*{limits.max_message_bytes}"):
            c.compute_hessian(problems.rosenbrock(dim=side), np.zeros(side))
        over = limits.max_iterations + 1
        with pytest.raises(ResourceExhausted, match=rf"stopping\.max_iterations: {over}"):
            c.start_run(problems.rosenbrock(), np.zeros(2), stopping={"max_iterations": over})
        samples = limits.max_spectrum_products // 2 + 1  # two estimators of that many each
        with pytest.raises(ResourceExhausted, match=r"options\.trace_samples.*100000"):
            c.analyze_curvature(problems.rosenbrock(), np.zeros(2), trace_samples=samples)
        with pytest.raises(InvalidArgument, match=r"page_size.*1000"):
            next(c.list_runs(page_size=limits.max_list_page_size + 1))
        with pytest.raises(ResourceExhausted, match=r"tensors\[0\]\.shape"):
            c.sample(0, [[limits.max_sample_elements + 1]])
        with pytest.raises(InvalidArgument, match=r"tensors\[1\]\.shape: .*nonzero product"):
            c.sample(0, [[2], [0, 2**31, 2**31]])  # no values, but sizes no array can describe


def test_runs_over_the_per_token_and_server_limits_are_refused(limited):
    problem = problems.rosenbrock(dim=2)
    # The only run worker waits on `gate`, so every run started here stays QUEUED (live, and
    # counted against both limits) until the refusals are checked: none can finish meanwhile
    # and free its slot, however slowly the machine runs.
    gate = occupy_workers(limited)
    runs = []
    with _client(limited) as a, _client(limited, "beta-token") as b:
        try:
            runs += [a.start_run(problem, np.zeros(2), **LONG) for _ in range(2)]
            with pytest.raises(ResourceExhausted, match="max_runs_per_token"):
                a.start_run(problem, np.zeros(2), **LONG)
            runs.append(b.start_run(problem, np.zeros(2), **LONG))  # 3 live: the server's limit
            with pytest.raises(ResourceExhausted, match="max_concurrent_runs"):
                b.start_run(problem, np.zeros(2), **LONG)
            assert limited.runs.queue_depth() == 3, "the held runs are all still queued"
        finally:
            gate.set()
            for run in runs:
                run.cancel()
                run.wait(30)
