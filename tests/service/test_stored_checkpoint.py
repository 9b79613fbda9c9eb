"""A checkpoint's bytes in the store: little-endian on any host, and back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_service.engine import Checkpoint
from hessian_service.store import RunRow, SQLiteRunStore, StoredCheckpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_checkpoint_is_stored_little_endian_and_read_back_bit_for_bit(tmp_path, dtype):
    params = torch.randn(3, 4, dtype=dtype, generator=torch.Generator().manual_seed(7))
    stored = StoredCheckpoint.of(Checkpoint(5, params.T, {"damping": 0.25}))  # not contiguous
    little = np.dtype("<f4" if dtype == torch.float32 else "<f8")
    assert stored.params == np.ascontiguousarray(params.T.numpy(), dtype=little).tobytes()
    assert (stored.iteration, stored.shape, stored.state) == (5, [4, 3], {"damping": 0.25})
    store = SQLiteRunStore(tmp_path)
    try:
        store.put_problem("p", b"")
        store.create_run(RunRow("r-1", "p", {"options": {}, "stopping": {}}), stored)
        back = store.latest_checkpoint("r-1").checkpoint()
    finally:
        store.close()
    assert back.params.dtype == dtype and torch.equal(back.params, params.T)
    assert (back.iteration, back.state) == (5, {"damping": 0.25})
