"""The `hessian` command line against a live server (main(), output captured)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hessian_client.cli import main
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective


def _cli(server, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--address", server.address, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_then_runs_watch_and_plot(server, capsys, tmp_path):
    code, out, err = _cli(
        server,
        capsys,
        "run",
        "--objective",
        "rosenbrock",
        "--option",
        "dim=3",
        "--method",
        "gradient_descent",
        "--lr",
        "0.001",
        "--max-iterations",
        "30",
        "--name",
        "cli-gd",
    )
    assert code == 0, err
    run_id = re.search(r"(r-[0-9a-f]+) FINISHED", out).group(1)
    assert "it     30/30" in err  # the progress bar's last state
    objective = make_objective("rosenbrock", {}, {"dim": 3})
    reference = list(
        Run(
            objective,
            objective.init_params(),
            MethodOptions(method="gradient_descent", learning_rate=0.001),
            StopCriteria(max_iterations=30),
        )
    )
    assert f"loss={reference[-1].loss:.6e}" in out

    code, out, _ = _cli(server, capsys, "runs", "--status", "FINISHED")
    assert code == 0 and run_id in out and "cli-gd" in out

    code, out, _ = _cli(server, capsys, "watch", run_id, "--from", "25")
    lines = out.strip().splitlines()
    assert [int(line.split()[0]) for line in lines[:-1]] == [25, 26, 27, 28, 29, 30]
    losses = [float(line.split()[2]) for line in lines[:-1]]
    np.testing.assert_allclose(losses, [r.loss for r in reference[25:]], rtol=1e-9)

    png = tmp_path / "losses.png"
    code, out, _ = _cli(server, capsys, "plot", run_id, "-o", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_and_errors(server, capsys):
    code, out, _ = _cli(server, capsys, "info")
    assert code == 0 and "objectives:" in out and "limits:" in out
    code, _, err = _cli(server, capsys, "cancel", "r-missing")
    assert code == 1 and "NOT_FOUND" in err and "run_id" in err
    code, _, err = _cli(server, capsys, "run", "--objective", "rosenbrock", "--lr", "-1")
    assert code == 1 and "options.learning_rate" in err


@pytest.mark.parametrize(
    ("bad", "status", "message"),
    [
        ("dim", 2, "argument --option: expected KEY=VALUE, got 'dim'"),  # argparse's usage error
        ("dim=", 1, "run: bad --data or --option for rosenbrock"),  # parsed, but not an int
    ],
)
def test_option_syntax(server, capsys, bad, status, message):
    with pytest.raises(SystemExit) as exited:
        main(["--address", server.address, "run", "--objective", "rosenbrock", "--option", bad])
    code = exited.value.code
    if isinstance(code, str):  # SystemExit("text"): Python prints it and exits with status 1
        assert message in code, code
        code = 1
    else:
        assert message in capsys.readouterr().err
    assert code == status
