"""The shared seed fixture (tests/conftest.py): the same draws in every process, a failure's
report names its seed, and HESSIAN_TEST_SEED replays it."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zlib

import torch

HERE = pathlib.Path(__file__).resolve().parent
PROBE = """
import json

import torch


def test_draw():
    print("DRAW", json.dumps(torch.randn(4, dtype=torch.float64).tolist()))


def test_fails():
    assert torch.rand(()) > 2
"""


def _pytest(folder: pathlib.Path, hash_seed: str, **env: str) -> str:
    """Run the probe module under tests/conftest.py in a fresh interpreter; its output."""
    environ = {k: v for k, v in os.environ.items() if k != "HESSIAN_TEST_SEED"}
    environ.update(PYTHONHASHSEED=hash_seed, **env)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_probe.py"],
        cwd=folder,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return out.stdout + out.stderr


def _draw(output: str) -> list[float]:
    line = next(line for line in output.splitlines() if line.startswith("DRAW"))
    return json.loads(line.removeprefix("DRAW "))


def _expected(seed: int) -> list[float]:
    return torch.randn(
        4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    ).tolist()


def test_seeds_are_stable_across_processes_reported_on_failure_and_replayable(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    first, second = _pytest(tmp_path, "1"), _pytest(tmp_path, "2")
    crc = zlib.crc32(b"test_probe.py::test_draw")
    # Different hash salts, the same data: the seed is the node id's CRC32, not hash().
    assert _draw(first) == _draw(second) == _expected(crc)
    failing = zlib.crc32(b"test_probe.py::test_fails")
    assert f"HESSIAN_TEST_SEED={failing} pytest 'test_probe.py::test_fails'" in first, first
    assert f"HESSIAN_TEST_SEED={crc}" not in first, "only a failing test reports its seed"
    replayed = _pytest(tmp_path, "3", HESSIAN_TEST_SEED="12345")
    assert _draw(replayed) == _expected(12345)
    assert "HESSIAN_TEST_SEED=12345 pytest 'test_probe.py::test_fails'" in replayed
    bad = _pytest(tmp_path, "4", HESSIAN_TEST_SEED="abc")
    assert "HESSIAN_TEST_SEED must be an integer, got 'abc'" in bad, bad
