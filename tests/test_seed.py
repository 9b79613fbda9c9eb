"""The seed notebook's GD-vs-Newton table, reproduced by the engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hessian_client.seed import improvement
from hessian_service import seed
from torch import nn


def notebook_losses(newton: bool) -> list[float]:
    """The notebook's own loop (torch.inverse and all), as the independent reference."""
    torch.manual_seed(0)
    params = torch.rand(5, 5, requires_grad=True)
    target = torch.rand(5, 5)
    criterion = nn.MSELoss(reduction="mean")
    losses = []
    for _ in range(40):
        loss = criterion(params, target)
        losses.append(loss.item())
        (grad,) = torch.autograd.grad(loss, params, create_graph=newton)
        if newton:
            flat = grad.flatten()
            rows = [
                torch.autograd.grad(flat[j], params, retain_graph=True)[0].flatten()
                for j in range(25)
            ]
            h = torch.stack(rows)
            params = (params.view(-1) - 0.1 * (torch.inverse(h) @ flat)).view(5, 5).detach()
            params.requires_grad_(True)
        else:
            params = (params - 0.1 * grad).detach().requires_grad_(True)
    return losses


@pytest.fixture(scope="module")
def losses() -> dict[str, list[float]]:
    return seed.seed_losses()


def test_seed_table_numbers(losses):
    assert len(losses["gd"]) == len(losses["newton"]) == 40
    assert round(losses["gd"][0], 4) == round(losses["newton"][0], 4) == 0.1446
    assert round(losses["gd"][30], 4) == 0.0893
    assert round(losses["newton"][30], 4) == 0.0003
    assert round(improvement(losses["gd"][0], losses["gd"][30]), 1) == 38.2
    assert round(improvement(losses["newton"][0], losses["newton"][30]), 1) == 99.8
    assert round(losses["gd"][39], 4) == 0.0773
    assert f"{losses['newton'][39]:.1e}" == "3.9e-05"


@pytest.mark.parametrize("method", ["gd", "newton"])
def test_engine_matches_the_notebook_loop(losses, method):
    reference = notebook_losses(newton=method == "newton")
    assert losses[method] == pytest.approx(reference, rel=1e-5, abs=1e-9)


def test_cli_json_and_plot(tmp_path, losses):
    png = tmp_path / "losses.png"
    out = subprocess.run(
        [sys.executable, "-m", "hessian_service.seed", "--json", "--plot", str(png)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(out) == losses
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_table_explains_the_trap():
    out = subprocess.run(
        [sys.executable, "-m", "hessian_service.seed"], check=True, capture_output=True, text=True
    ).stdout
    assert "0.1446" in out and "0.0893" in out and "0.0003" in out
    assert "38.2%" in out and "99.8%" in out
    assert "iteration 30" in out and "0.07727" in out and "3.9e-05" in out
