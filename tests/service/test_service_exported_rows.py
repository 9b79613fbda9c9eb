"""Exported programs with a row count through a real server: Predict on new rows and a
mini-batch run, against the plain function and the catalogue least_squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_client import ResourceExhausted, problems

F64 = torch.float64
N, D = 30, 3


def outputs(params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return X @ params.reshape(D, 1)


def least_squares(params: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r = outputs(params, X) - y.reshape(-1, 1)
    return 0.5 * torch.mean(r * r) + 0.025 * torch.sum(params * params)


def data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(21)
    return {
        "X": torch.randn(N, D, generator=gen, dtype=F64),
        "y": torch.randn(N, generator=gen, dtype=F64),
    }


def test_predict_on_new_rows_through_the_server(client):
    """Predict on 11 new rows of a program exported with rows=(X,) (it has 30)."""
    tensors = data()
    problem = problems.exported(
        outputs,
        torch.zeros(D, dtype=F64),
        {"X": tensors["X"], "y": tensors["y"].reshape(-1, 1)},
        loss="mse",
        rows=("X",),
    )
    x, new = np.random.default_rng(2).normal(size=D), np.random.default_rng(3).normal(size=(11, D))
    got = client.predict(problem, x, new)
    np.testing.assert_allclose(got, new @ x.reshape(D, 1), rtol=1e-12, atol=1e-14)


def test_mini_batch_run_matches_the_catalogue_least_squares(client):
    """Newton-CG with gradient_fraction 0.5 and one seed: the exported twin (rows=(X, y)) and
    the catalogue least_squares (l2 0.05 = 2 x 0.025, no intercept) draw the same rows and
    give the same records."""
    tensors = data()
    twin = problems.exported(least_squares, torch.zeros(D, dtype=F64), tensors, rows=("X", "y"))
    catalogue = problems.least_squares(tensors["X"], tensors["y"], l2=0.05)
    x = np.random.default_rng(4).normal(size=D)
    options = {"method": "newton_cg", "gradient_fraction": 0.5, "curvature_seed": 5,
               "backend": "autograd"}  # fmt: skip
    runs = [
        client.start_run(p, x, stopping={"max_iterations": 3}, **options) for p in (twin, catalogue)
    ]
    assert all(run.result(timeout=60).status == "FINISHED" for run in runs)
    ours, ref = (run.records() for run in runs)
    assert len(ours) == len(ref) >= 2
    for a, b in zip(ours, ref, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-10)
        assert a.gradient_batch_size == b.gradient_batch_size
    assert ours[0].gradient_batch_size == N // 2


def test_predict_rows_a_row_symbol_would_inflate_past_the_total_are_named_inputs(client):
    """A program bound to 3,000,000 new rows declares 24 M-element values: refused before
    it runs, naming inputs (it named the program, which the caller did not change)."""

    def fn(params, X):
        return torch.tanh(X @ params.reshape(1, 8)).sum(dim=1)

    x = torch.randn(100, 1, dtype=torch.float64)
    problem = problems.exported(fn, torch.zeros(8, dtype=torch.float64),
                                {"X": x, "y": torch.randn(100, dtype=torch.float64)},
                                loss="mse", rows=["X"])  # fmt: skip
    with pytest.raises(ResourceExhausted, match=r"^RESOURCE_EXHAUSTED: inputs: 3000000 rows: "):
        client.predict(problem, np.zeros(8), inputs=np.zeros((3_000_000, 1)))
