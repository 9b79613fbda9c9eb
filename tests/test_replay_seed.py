"""The shared seed fixture (tests/conftest.py): the same draws in every process (torch, the
NumPy `rng` fixture and Hypothesis), a failure's report names its seed, and HESSIAN_TEST_SEED
replays it."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zlib

import hypothesis
import numpy as np
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

HERE = pathlib.Path(__file__).resolve().parent
PROBE = """
import json

import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st


def test_draw():
    print("DRAW", json.dumps(torch.randn(4, dtype=torch.float64).tolist()))


def test_numpy(rng):
    print("NUMPY", json.dumps(rng.standard_normal(4).tolist()))


@settings(max_examples=6, phases=(Phase.generate,), deadline=None)
@given(st.binary(min_size=8, max_size=8))
def test_hypothesis(data):
    print("HYPOTHESIS", data.hex())


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


def _draw(output: str, tag: str = "DRAW") -> list[float]:
    """The probe's printed draw (after pytest's progress dots, when not the first test)."""
    return json.loads(re.search(rf"{tag} (\[.*\])$", output, re.MULTILINE)[1])


def _examples(output: str) -> list[str]:
    """The Hypothesis probe's examples, in the order drawn."""
    return re.findall(r"HYPOTHESIS ([0-9a-f]*)$", output, re.MULTILINE)


def _expected(seed: int) -> list[float]:
    return torch.randn(
        4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    ).tolist()


def _expected_numpy(seed: int) -> list[float]:
    return np.random.default_rng(seed).standard_normal(4).tolist()


def _expected_examples(seed: int) -> list[str]:
    """What the Hypothesis probe draws under hypothesis.seed(seed), drawn here."""
    seen: list[str] = []

    @hypothesis.seed(seed)
    @settings(max_examples=6, phases=(Phase.generate,), database=None, deadline=None)
    @given(st.binary(min_size=8, max_size=8))
    def probe(data: bytes) -> None:
        seen.append(data.hex())

    probe()
    return seen


def test_seeds_are_stable_across_processes_reported_on_failure_and_replayable(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    first, second = _pytest(tmp_path, "1"), _pytest(tmp_path, "2")
    crc = zlib.crc32(b"test_probe.py::test_draw")
    # Different hash salts, the same data: the seed is the node id's CRC32, not hash().
    assert _draw(first) == _draw(second) == _expected(crc)
    numpy_crc = zlib.crc32(b"test_probe.py::test_numpy")
    assert _draw(first, "NUMPY") == _draw(second, "NUMPY") == _expected_numpy(numpy_crc)
    assert len(set(_examples(first))) > 3, first  # random examples, not one repeated
    # Hypothesis too: seeded with the same CRC32, no OS entropy.
    hypothesis_crc = zlib.crc32(b"test_probe.py::test_hypothesis")
    assert _examples(first) == _examples(second) == _expected_examples(hypothesis_crc)
    failing = zlib.crc32(b"test_probe.py::test_fails")
    assert f"HESSIAN_TEST_SEED={failing} pytest 'test_probe.py::test_fails'" in first, first
    assert f"HESSIAN_TEST_SEED={crc}" not in first, "only a failing test reports its seed"
    replayed = _pytest(tmp_path, "3", HESSIAN_TEST_SEED="12345")
    assert _draw(replayed) == _expected(12345)
    assert _draw(replayed, "NUMPY") == _expected_numpy(12345)
    assert _examples(replayed) != _examples(first)  # another seed, other examples
    assert _examples(replayed) == _expected_examples(12345)  # hypothesis.seed(12345)'s own
    assert "HESSIAN_TEST_SEED=12345 pytest 'test_probe.py::test_fails'" in replayed
    bad = _pytest(tmp_path, "4", HESSIAN_TEST_SEED="abc")
    assert "HESSIAN_TEST_SEED must be an integer, got 'abc'" in bad, bad
    negative = _pytest(tmp_path, "6", HESSIAN_TEST_SEED="-1")
    assert "HESSIAN_TEST_SEED must be in [0, 2**64), got -1" in negative, negative
