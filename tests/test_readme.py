"""README.md stays true: its quick start, tour, RPC table and configuration table.

The tour's Python block is run as written against a live server (in-process, free loopback
port) and its Newton result is compared with an independent float64 minimiser (scipy
L-BFGS on a numpy logistic loss). The RPC table must name exactly the RPCs of
service.proto, and the configuration table every flag `hessian-server --help` lists.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hessian_service.server import ServerConfig, build_server
from scipy.optimize import minimize

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The text of the README section `## title` up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def table_rows(text: str) -> list[list[str]]:
    """Markdown table rows (header and separator dropped) as lists of stripped cells."""
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    return rows[2:]


def test_quick_start_is_exactly_make_run_and_make_test() -> None:
    (block,) = code_blocks(section("Quick start"), "sh")
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["make run", "make test"]


def test_rpc_table_names_every_rpc_of_the_proto() -> None:
    proto = (ROOT / "protos" / "hessian" / "v1" / "service.proto").read_text()
    rpcs = re.findall(r"^\s*rpc (\w+)\((stream )?(\w+)\) returns \((stream )?(\w+)\)", proto, re.M)
    rows = table_rows(section("API reference"))
    documented = {row[0].strip("`"): row[1] for row in rows}
    assert set(documented) == {name for name, *_ in rpcs}
    for name, in_stream, request, stream, response in rpcs:
        expected = f"{in_stream}`{request}` -> {stream}`{response}`"
        assert documented[name] == expected, (name, documented[name], expected)


def test_configuration_table_lists_every_server_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    flags = set(re.findall(r"--([a-z][a-z0-9-]+)", out)) - {"help"}
    flags -= {f for f in flags if f.startswith("no-") and f[3:] in flags}  # an on/off's --no-
    rows = {row[0].strip("`"): row for row in table_rows(section("Configuration")) if row[0]}
    missing = {f"--{f}" for f in flags} - set(rows)
    assert not missing, f"add rows to README's Configuration table for {sorted(missing)}"
    assert not set(rows) - {f"--{f}" for f in flags}, "README documents flags the server lacks"
    defaults = {f"--{k.replace('_', '-')}": v for k, v in vars(ServerConfig()).items()}
    for flag, (_, env, default, _meaning) in rows.items():
        assert env == f"`HESSIAN_{flag[2:].replace('-', '_').upper()}`", flag
        if flag in defaults:
            expected = str(defaults[flag]) if defaults[flag] != "" else "(empty)"
            assert default.strip("`") == expected, (flag, default, expected)


def reference_logistic_fit(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Minimiser and minimum of mean(softplus(z) - y z) + 0.5 l2 |w|^2, z = X w + b (float64)."""
    design = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.r_[np.ones(x.shape[1]), 0.0]

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = design @ theta
        loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * np.sum(penalty * theta**2)
        grad = design.T @ (1.0 / (1.0 + np.exp(-z)) - y) / len(y) + l2 * penalty * theta
        return loss, grad

    res = minimize(
        loss_and_grad,
        np.zeros(design.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 1000},
    )
    return res.x, float(res.fun)


@pytest.fixture
def live_server(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """A real server on a free loopback port; HESSIAN_ADDRESS points the tour's Client at it."""
    handle = build_server(ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path)))
    monkeypatch.setenv("HESSIAN_ADDRESS", handle.address)
    yield handle
    handle.stop(grace=1.0)


def test_tour_runs_as_written_and_newton_reaches_the_reference_minimum(live_server) -> None:
    (script,) = code_blocks(section("A five-minute tour"), "python")
    namespace: dict = {"__name__": "readme_tour"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(script, "README.md (tour)", "exec"), namespace)
    losses = [float(v) for v in re.findall(r"^it +\d+ +loss (\S+)", out.getvalue(), re.M)]
    assert len(losses) >= 3 and all(b <= a for a, b in itertools.pairwise(losses))
    x, y = namespace["X"], namespace["y"]
    params, minimum = reference_logistic_fit(x, y, l2=1e-3)
    result = namespace["result"]
    assert result.status == "FINISHED"
    np.testing.assert_allclose(result.params, params, atol=1e-5)
    assert abs(losses[-1] - minimum) <= 1e-8
    assert f"{namespace['run'].id} FINISHED" in out.getvalue()


def test_the_client_readme_cli_synopsis_names_every_subcommand() -> None:
    """The synopsis left delete-problem out; it is read against the parser's subcommands."""
    import argparse

    from hessian_client.cli import parser

    (sub,) = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    text = (ROOT / "client" / "README.md").read_text()
    synopsis = text[text.index("- CLI: `hessian") :].split("`;", 1)[0]
    listed = {word.strip("`[] ") for part in synopsis.split("|") for word in part.split()[:1]}
    listed |= {synopsis.split("]", 1)[1].split("|", 1)[0].strip()}  # the first, after the flags
    assert set(sub.choices) <= listed, sorted(set(sub.choices) - listed)
