"""The `hessian` command line against a live server (main(), output captured): every
subcommand with --json parsed, one-line errors with exit codes, exports and plots."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hessian_client import API_VERSION, __version__
from hessian_client.cli import main, plot_series
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective


def _cli(server, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--address", server.address, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json_lines(out: str) -> list:
    return [json.loads(line) for line in out.strip().splitlines()]


def _reference(n: int = 30):
    objective = make_objective("rosenbrock", {}, {"dim": 3})
    return list(
        Run(
            objective,
            objective.init_params(),
            MethodOptions(method="gradient_descent", learning_rate=0.001),
            StopCriteria(max_iterations=n),
        )
    )


GD_RUN = (
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


def test_run_then_runs_watch_and_plot(server, capsys, tmp_path):
    code, out, err = _cli(server, capsys, *GD_RUN)
    assert code == 0, err
    run_id = re.search(r"(r-[0-9a-f]+) FINISHED", out).group(1)
    assert "\r" not in err and "it/s" not in err  # no progress bar when stderr is no tty
    reference = _reference()
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


def test_every_subcommand_speaks_json(server, capsys, tmp_path):
    reference = _reference()
    code, out, err = _cli(server, capsys, *GD_RUN, "--json")
    assert code == 0, err
    *records, final = _json_lines(out)
    assert [r["iteration"] for r in records] == list(range(31))
    assert [r["loss"] for r in records] == [r.loss for r in reference]
    assert final["status"] == "FINISHED" and final["stop_reason"] == "max_iterations"
    run_id = final["run_id"]

    checks = {
        ("info",): lambda v: v["api_version"] == API_VERSION and v["limits"]["workers"] == 2,
        ("runs", "--limit", "1"): lambda v: v["run_id"] == run_id,
        ("watch", run_id, "--from", "29"): lambda v: v["iteration"] == 29,
        ("cancel", run_id): lambda v: v["status"] == "FINISHED",
        ("records", run_id): lambda v: v["iteration"] == 0 and isinstance(v["iteration"], int),
        ("plot", run_id, "--y", "loss_gap", "-o", str(tmp_path / "g.png")): lambda v: (
            v["y"] == "loss_gap"
        ),
        ("completion", "bash"): lambda v: "hessian" in v["script"],
        ("seed",): lambda v: len(v["gd"]) == 40 and v["newton"][0] == v["gd"][0],
    }
    for args, check in checks.items():
        code, out, err = _cli(server, capsys, *args, "--json")
        assert code == 0, (args, err)
        first = _json_lines(out)[0]
        assert check(first), (args, first)

    x0 = tmp_path / "x0.npy"
    np.save(x0, np.array([-1.0, 1.0, 0.5]))
    code, out, err = _cli(
        server,
        capsys,
        "curvature",
        "--objective",
        "rosenbrock",
        "--option",
        "dim=3",
        "--params",
        str(x0),
        "--json",
        "--trace-samples",
        "0",
    )
    assert code == 0, err
    got = _json_lines(out)[0]
    hessian = make_objective("rosenbrock", {}, {"dim": 3})
    import torch

    exact = torch.autograd.functional.hessian(
        hessian.loss, torch.tensor([-1.0, 1.0, 0.5], dtype=torch.float64)
    )
    top = float(torch.linalg.eigvalsh(exact)[-1])
    assert abs(got["top_eigenvalues"][0] - top) <= 1e-6 * top

    run = _cli(server, capsys, *GD_RUN, "--detach", "--json")
    assert run[0] == 0 and _json_lines(run[1])[0]["status"] in ("QUEUED", "RUNNING", "FINISHED")


def test_records_export_csv_and_jsonl_are_lossless(server, capsys, tmp_path):
    code, out, _ = _cli(server, capsys, *GD_RUN, "--json")
    run_id = _json_lines(out)[-1]["run_id"]
    reference = _reference()
    code, out, _ = _cli(server, capsys, "records", run_id, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["iteration"]) for r in rows] == list(range(31))
    assert [float(r["loss"]) for r in rows] == [r.loss for r in reference]
    assert {r["end_point"] for r in rows} == {""}  # a verdict not given (it was "nan")
    code, _, err = _cli(server, capsys, "records", run_id, "-o", str(tmp_path / "no" / "r.csv"))
    assert code == 2 and err.count("\n") == 1 and f"--output {tmp_path / 'no' / 'r.csv'}" in err
    path = tmp_path / "r.jsonl"
    code, _, _ = _cli(server, capsys, "records", run_id, "--format", "jsonl", "-o", str(path))
    lines = _json_lines(path.read_text())
    assert lines[0]["iteration"] == 0 and lines[5]["function_evaluations"] == 0
    assert all(isinstance(line["negative_eigenvalues"], int) for line in lines)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        code, _, err = _cli(
            server,
            capsys,
            "records",
            run_id,
            "--format",
            "parquet",
            "-o",
            str(tmp_path / "r.parquet"),
        )
        assert code == 2 and "pip install pyarrow" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("run", "--objective", "rosenbrock", "--method", "lbfgs"), ["newton_cg", "'lbfgs'"]),
        (
            ("run", "--objective", "logistic_regression", "--data", "missing.npz"),
            ["--data", "no such file", "missing.npz"],
        ),
        (("runs", "--status", "bogus"), ["FINISHED", "'bogus'"]),
        (
            ("run", "--objective", "rosenbrock", "--seed", "1", "--init", "normal_random"),
            ["normal", "objective_default"],
        ),
        # a flag's value the server refuses names the flag (it said options.learning_rate,
        # stopping.max_iterations, initial_params, and exited 1)
        (("run", "--objective", "rosenbrock", "--lr", "-1"), ["--lr: expected", "> 0"]),
        (("run", "--objective", "rosenbrock", "--max-iterations", "-1"), ["--max-iterations:"]),
        (
            ("run", "--objective", "rosenbrock", "--max-iterations", "99999999999"),
            ["--max-iterations:", "server limit"],
        ),
        (("run", "--objective", "rosenbrock", "--option", "dim=1"), ["--option dim: expected"]),
        (
            ("run", "--objective", "rosenbrock", "--step-policy", "trust_region"),
            ["--step-policy: expected", "line_search"],
        ),
        (("run", "--objective", "rosenbrock", "--option", "dim="), ["rosenbrock"]),
        (("run", "--objective", "rosenbrock", "--option", "dim"), ["KEY=VALUE"]),
        (("nonsense",), ["invalid choice"]),
        # arguments that were not UTF-8 (Python hands them over as lone surrogates): a
        # traceback ending in UnicodeEncodeError, exit 1
        (("watch", "r-\udcff"), ["run_id", "UTF-8"]),
        (("cancel", "r-\udcff"), ["run_id", "UTF-8"]),
        (("delete-problem", "p-\udcff"), ["problem_id", "UTF-8"]),
        (("run", "--objective", "rosenbrock", "--name", "\udcff"), ["name", "UTF-8"]),
        (("run", "--problem-id", "p-\udcff"), ["--problem-id", "UTF-8"]),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(server, capsys, args, words):
    try:
        code = main(["--address", server.address, *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err


def test_server_errors_are_one_line_and_exit_1(server, capsys):
    code, _, err = _cli(server, capsys, "cancel", "r-missing")
    assert code == 1 and "NOT_FOUND" in err and "run_id" in err and len(err.splitlines()) == 1
    code, _, err = _cli(server, capsys, "run", "--problem-id", "p-missing")
    assert code == 1 and "NOT_FOUND" in err and len(err.splitlines()) == 1


def test_version_and_help_show_choices_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "saddle_free" in text and "(default: newton)" in text and "--json" in text
    for command in ("run", "records", "curvature", "runs", "delete-problem"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        # the subcommands' formatter printed argparse's own "(default: None)" after ours
        for shown in ("(default: None)", "(default: False)", "(default: )"):
            assert shown not in text, (command, shown)
    with pytest.raises(SystemExit):
        main(["watch", "--help"])
    assert "(default: 0)" in capsys.readouterr().out  # 0 == False, yet a default to show


def test_runs_status_takes_any_case_as_the_sdk_does(server, capsys):
    code, _, err = _cli(server, capsys, "runs", "--status", "finished", "--status", "Failed")
    assert code == 0, err


def test_a_queued_run_shows_no_last_loss(tmp_path, capsys):
    from conftest import start_server
    from hessian_client import Client, problems
    from long_runs import start_endless_run

    server = start_server(tmp_path, workers=1)
    try:
        with Client(server.address) as c:
            busy = start_endless_run(c)
            next(iter(busy.stream()))
            queued = c.start_run(problems.rosenbrock(), seed=0, name="waiting")
            code, out, _ = _cli(server, capsys, "runs", "--status", "QUEUED")
            assert code == 0
            (line,) = [line for line in out.splitlines() if queued.id in line]
            assert line.split()[:5] == [queued.id, "QUEUED", "newton", "0", "-"]
            assert "0.000000e+00" not in line
            busy.cancel()
            queued.cancel()
    finally:
        server.stop(grace=1.0)


def test_loss_gap_shows_quadratic_convergence():
    losses = np.array([2.0, 1.5, 1.0 + 1e-2, 1.0 + 1e-4, 1.0 + 1e-8, 1.0])
    gap = plot_series(losses, losses, "loss_gap")
    np.testing.assert_allclose(gap[:5], [1.0, 0.5, 1e-2, 1e-4, 1e-8], rtol=1e-6)
    assert np.isnan(gap[5])  # the best point itself has no log-scale value
    assert np.isnan(plot_series(np.array([0.0, 1.0]), np.zeros(2), "loss")[0])


def test_loss_gaps_of_several_runs_are_measured_from_their_common_best(rng):
    """Each run's gap was taken from its own lowest loss: a gradient-descent run still 0.07
    above Newton's minimum showed gaps falling to 2e-3 and then none, as if converging."""
    newton = 1.0 + 10.0 ** -np.array([0.0, 1.0, 3.0, 7.0, 15.0])
    gd = 1.07 + 0.1 * rng.random() + np.linspace(0.5, 0.0, 5)
    best = min(newton.min(), gd.min())
    np.testing.assert_allclose(plot_series(gd, gd, "loss_gap", best), gd - best, rtol=1e-12)
    assert (plot_series(gd, gd, "loss_gap", best) >= 0.07).all()


def test_missing_matplotlib_names_an_installable_package(server, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = _cli(server, capsys, "plot", "r-any")
    assert code == 2 and "pip install matplotlib" in err and "[plot]" not in err
    assert len(err.splitlines()) == 1


def test_plot_to_a_file_of_no_image_format_is_a_usage_error_before_any_read(
    server, capsys, tmp_path
):
    """-o out.txt was matplotlib's ValueError traceback after every run was read; -o NAME
    (no suffix) said "plot written to NAME" where matplotlib wrote NAME.png."""
    code, _, err = _cli(server, capsys, "plot", "r-unknown", "-o", str(tmp_path / "out.txt"))
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "--output" in err and "out.txt" in err and ".png" in err and ".svg" in err
    assert not (tmp_path / "out.txt").exists()
    code, out, err = _cli(server, capsys, *GD_RUN)
    run_id = re.search(r"(r-[0-9a-f]+) FINISHED", out).group(1)
    code, out, err = _cli(server, capsys, "plot", run_id, "-o", str(tmp_path / "noext"))
    png = tmp_path / "noext.png"
    assert code == 0 and out.strip() == f"plot written to {png}", (out, err)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shell_completion_offers_the_choices(tmp_path):
    pytest.importorskip("argcomplete")
    out = tmp_path / "completions"
    line = "hessian run --method new"
    env = dict(
        os.environ,
        _ARGCOMPLETE="1",
        _ARGCOMPLETE_IFS="\n",
        COMP_LINE=line,
        COMP_POINT=str(len(line)),
        _ARGCOMPLETE_STDOUT_FILENAME=str(out),
    )
    done = subprocess.run(
        [sys.executable, "-m", "hessian_client"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text().split("\n") == ["newton", "newton_cg"]


def test_an_older_server_gets_a_one_line_warning_naming_both_versions(server, capsys, monkeypatch):
    from hessian_client import client as sdk

    monkeypatch.setattr(sdk, "API_VERSION", "1.99")  # as if this client were newer
    code, out, err = _cli(server, capsys, "info")
    assert code == 0 and "objectives:" in out
    (line,) = err.splitlines()
    assert line.startswith("hessian: warning: hessian-client") and "API 1.99" in line
    assert f"speaks API {API_VERSION}" in line


def test_cancel_of_an_ended_run_says_it_had_ended(server, capsys):
    code, out, _ = _cli(server, capsys, *GD_RUN, "--json")
    run_id = _json_lines(out)[-1]["run_id"]
    code, out, err = _cli(server, capsys, "cancel", run_id)
    assert code == 0, err
    assert out.strip() == f"run {run_id} had already ended (FINISHED): nothing to cancel"


def test_a_reader_that_goes_away_is_not_an_error(server, capsys):
    # `hessian records RUN | head -1` printed "error: [Errno 32] Broken pipe"
    long_run = [*GD_RUN[:-3], "3000", "--json"]  # --max-iterations 3000
    _, out, _ = _cli(server, capsys, *long_run)
    run_id = _json_lines(out)[-1]["run_id"]
    reader = subprocess.Popen(
        [sys.executable, "-m", "hessian_client", "--address", server.address, "records",
         run_id, "--format", "jsonl"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert json.loads(reader.stdout.readline())["iteration"] == 0
    reader.stdout.close()  # 3,000 records overflow the pipe: the next write finds no reader
    assert reader.wait(timeout=60) == 0
    assert reader.stderr.read() == b""


def test_json_gives_enums_inside_messages_by_the_same_names_as_outside(server, capsys):
    # `hessian runs --json` wrote "METHOD_GRADIENT_DESCENT" beside "method": "gradient_descent"
    _, out, _ = _cli(server, capsys, *GD_RUN, "--json")
    run_id = _json_lines(out)[-1]["run_id"]
    _, out, _ = _cli(server, capsys, "runs", "--json", "--limit", "50")
    (info,) = [v for v in _json_lines(out) if v["run_id"] == run_id]
    assert info["method"] == info["options"]["method"] == "gradient_descent"
    assert info["status"] == "FINISHED"


def test_plot_measures_every_run_from_the_lowest_loss_plotted(
    server, capsys, tmp_path, monkeypatch
):
    """`hessian plot A B --y loss_gap` through the CLI: the curves drawn are each run's
    losses less the lowest loss of both runs (captured from matplotlib's semilogy)."""
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.semilogy

    def capture(self, x, y, *args, **kwargs):
        drawn.append(np.asarray(y))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "semilogy", capture)
    ids = []
    for method in ("newton", "gradient_descent"):
        args = [a if a != "gradient_descent" else method for a in GD_RUN]
        code, out, err = _cli(server, capsys, *args, "--json")
        assert code == 0, err
        ids.append(_json_lines(out)[-1]["run_id"])
    code, _, err = _cli(
        server, capsys, "plot", *ids, "--y", "loss_gap", "-o", str(tmp_path / "g.png")
    )
    assert code == 0, err
    losses = [
        np.array([r["loss"] for r in _json_lines(_cli(server, capsys, "records", i, "--json")[1])])
        for i in ids
    ]
    best = min(float(v.min()) for v in losses)
    for y, loss in zip(drawn, losses, strict=True):
        want = loss - best
        want[want <= 0] = np.nan
        np.testing.assert_array_equal(y, want)


def test_a_listing_escapes_control_characters_in_names():
    """A name stored by an older server may hold terminal escapes, CR and NUL: `hessian
    runs` printed them as they were (forging rows, running escape sequences)."""
    from hessian_client.cli import printable

    assert printable("plain name, é 日本") == "plain name, é 日本"
    assert printable("x\x1b[2J\r\nr-0 FINISHED\x00") == "x\\x1b[2J\\r\\nr-0 FINISHED\\x00"


def test_watch_exits_alike_in_every_output_format_for_a_run_not_finished(server, capsys):
    """For one CANCELLED run, `watch` exited 0 while `watch --json` and `--progress` exited
    1 (the rule `run` and `resume` follow: 0 only for FINISHED)."""
    from hessian_client import Client, problems

    with Client(server.address) as client:
        slow = {"method": "gradient_descent", "learning_rate": 1e-6}
        run = client.start_run(problems.rosenbrock(2), np.zeros(2), **slow,
                               stopping={"max_iterations": 1_000_000})  # fmt: skip
        client.cancel_run(run.id)
        assert run.wait(timeout=60).status == "CANCELLED"
        finished = client.start_run(problems.rosenbrock(2), np.zeros(2),
                                    stopping={"max_iterations": 2})  # fmt: skip
        finished.wait(timeout=60)
    for flags in ((), ("--json",), ("--progress",)):
        assert _cli(server, capsys, "watch", run.id, *flags)[0] == 1, flags
        assert _cli(server, capsys, "watch", finished.id, *flags)[0] == 0, flags


def test_resume_follows_the_new_records_not_the_run_from_its_first(tmp_path, capsys):
    """`hessian resume` printed every record the run had before its interruption again
    (from iteration 0) before the new ones; it follows the records the resume adds."""
    from conftest import start_server, wait_until
    from hessian_client import Client, problems

    handle = start_server(tmp_path)
    try:
        with Client(handle.address) as client:
            run = client.start_run(problems.rosenbrock(2), np.zeros(2),
                                   method="gradient_descent", learning_rate=1e-4,
                                   stopping={"max_iterations": 3000})  # fmt: skip
            assert wait_until(lambda: client.get_run(run.id).num_records > 50)
    finally:
        handle.stop(grace=5.0)  # the run is kept INTERRUPTED at its checkpoint
    handle = start_server(tmp_path)
    try:
        with Client(handle.address) as client:
            before = client.get_run(run.id)
        assert before.status == "INTERRUPTED" and 0 < before.num_records < 3000
        code, out, _ = _cli(handle, capsys, "resume", run.id, "--json")
        *records, final = _json_lines(out)
    finally:
        handle.stop()
    assert code == 0 and final["status"] == "FINISHED"
    iterations = [r["iteration"] for r in records]
    assert iterations == list(range(before.num_records, 3001))


def test_a_refused_field_is_named_by_its_own_flag_only():
    """options.seed (the sub-samples' seed) is not --seed (the start's draw): a refusal of it
    keeps its field name rather than blaming a flag the caller may have set right."""
    import argparse

    from hessian_client.cli import _flag_of

    args = argparse.Namespace(seed=None, lr=None, max_iterations=None, params=None)
    assert _flag_of("options.seed", args) is None
    assert _flag_of("seed", args) == "--seed"
    assert _flag_of("options.learning_rate", args) == "--lr"
    assert _flag_of("stopping.max_iterations", args) == "--max-iterations"
    assert _flag_of("initial_params.shape", args) == "--params"
    assert _flag_of("problem.data.X", args) == "--data"
    args.objective = "logistic_regression"
    assert _flag_of("problem.logistic_regression.l2", args) == "--option l2"
    assert _flag_of("problem.exported.program", args) is None
