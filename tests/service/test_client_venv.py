"""The client distribution installs into a fresh venv without torch and passes its own tests
there, against a server started from the main environment."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from hessian_service.seed import format_table, seed_losses

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_client_installs_and_passes_its_tests_in_a_venv_without_torch(server, tmp_path):
    python = shutil.which("python3.11") or sys.executable
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    source = tmp_path / "client"
    shutil.copytree(
        ROOT / "client",
        source,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "tests"),
    )
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    install = subprocess.run(
        [*pip, str(source), "pytest"], capture_output=True, text=True, timeout=900
    )
    assert install.returncode == 0, install.stdout + install.stderr
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util as u; print(u.find_spec('torch'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "None", "the fresh venv must not have torch"
    table = tmp_path / "seed_table.txt"
    table.write_text(format_table(seed_losses()) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        HESSIAN_TEST_ADDRESS=server.address,
        HESSIAN_TEST_SEED_TABLE=str(table),
        HESSIAN_TEST_EXPECT_NO_TORCH="1",
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
    )
    result = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT / "client"),
            str(ROOT / "client" / "tests"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 passed" in result.stdout, result.stdout
