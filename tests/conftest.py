"""Replayable randomness for every test: one seed per test drives all of its draws.

The seed is the CRC32 of the test's node id (stable across processes, unlike `hash`, which
Python salts per run), or `HESSIAN_TEST_SEED` when set, to replay a failure. It seeds torch's
global generator, the `rng` fixture (a NumPy Generator; helpers without fixtures take
`np.random.default_rng(torch.initial_seed())`) and every Hypothesis test (`@given` at module
level is seeded here; a `@given` defined inside a test takes `hypothesis.seed(replay_seed)`).
Tests draw from nothing else: no unseeded `np.random.default_rng()`, no OS entropy. A failing
test's report carries a "seed" section naming the value and the command that replays it.
`address` is the real loopback server the SDK-level tests (minimize, least_squares,
examples) talk to, one per test module.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

SEED_VARIABLE = "HESSIAN_TEST_SEED"
_SEED_KEY = pytest.StashKey[int]()


def test_seed_for(nodeid: str) -> int:
    """The seed a test draws from: $HESSIAN_TEST_SEED if set, else the CRC32 of its node id."""
    override = os.environ.get(SEED_VARIABLE, "").strip()
    if override:
        try:
            seed = int(override)
        except ValueError:
            message = f"{SEED_VARIABLE} must be an integer, got {override!r}"
            raise pytest.UsageError(message) from None
        if not 0 <= seed < 2**64:  # what torch.manual_seed and NumPy both take
            message = f"{SEED_VARIABLE} must be in [0, 2**64), got {seed}"
            raise pytest.UsageError(message)
        return seed
    return zlib.crc32(nodeid.encode())


test_seed_for.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def replay_seed(request: pytest.FixtureRequest) -> int:
    """This test's seed: seeds torch's global generator and, for a Hypothesis test, its draws
    (hypothesis.seed, which also turns its example database off: the seed alone replays).
    Remembered for the failure report."""
    seed = test_seed_for(request.node.nodeid)
    request.node.stash[_SEED_KEY] = seed
    torch.manual_seed(seed)
    function = getattr(request.node, "function", None)
    if getattr(function, "is_hypothesis_test", False):
        import hypothesis  # only where a test uses it

        hypothesis.seed(seed)(function)
    return seed


@pytest.fixture
def rng(replay_seed: int) -> np.random.Generator:
    """A NumPy generator seeded with this test's seed: fresh data per test id, replayable."""
    return np.random.default_rng(replay_seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Add the seed to a failed test's report, so the failure can be replayed."""
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if report.failed and seed is not None:
        replay = f"{SEED_VARIABLE}={seed} pytest '{item.nodeid}'"
        drawn = "torch, the rng fixture and Hypothesis seeded with"
        report.sections.append(("seed", f"{drawn} {seed}; replay: {replay}"))
    return report


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server on loopback for this test module, with a fresh data directory."""
    from hessian_service.server import ServerConfig, build_server  # grpc only where used

    server = build_server(
        ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path_factory.mktemp("server")))
    )
    yield server.address
    server.stop(grace=1.0)
