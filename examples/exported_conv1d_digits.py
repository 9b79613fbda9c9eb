"""Your own model on the server: a 1-D convolutional net (which the catalogue does not have)
on scikit-learn's digits read as 64-sample signals, exported with torch.export and trained
by Newton-CG on the server (needs torch and scikit-learn: pip install 'hessian-client[torch]').

The server never runs code from the client: it verifies the exported graph (allowlisted ATen
operators only) and interprets it; curvature comes from autograd on that graph.
"""

from __future__ import annotations

import numpy as np
import torch
from hessian_client import Client, problems
from sklearn.datasets import load_digits

CHANNELS, KERNEL, LENGTH, CLASSES = 4, 5, 64, 10
OUT = LENGTH - KERNEL + 1
SHAPES = [(CHANNELS, 1, KERNEL), (CHANNELS,), (CLASSES, CHANNELS * OUT), (CLASSES,)]


def logits(params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """conv1d -> tanh -> linear, all weights read from the flat `params`."""
    parts, at = [], 0
    for shape in SHAPES:
        n = int(np.prod(shape))
        parts.append(params[at : at + n].reshape(shape))
        at += n
    w_conv, b_conv, w_out, b_out = parts
    h = torch.tanh(torch.nn.functional.conv1d(X.unsqueeze(1), w_conv, b_conv))
    return torch.nn.functional.linear(h.flatten(1), w_out, b_out)


def mean_cross_entropy(params: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    """The loss the server minimises, evaluated here in eager torch."""
    return float(torch.nn.functional.cross_entropy(logits(params, X), y))


if __name__ == "__main__":
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, test = order[:500], order[500:]
    n_params = sum(int(np.prod(s)) for s in SHAPES)
    start = 0.1 * torch.randn(n_params, generator=torch.Generator().manual_seed(1), dtype=X.dtype)
    problem = problems.exported(logits, start, {"X": X[train], "y": y[train]}, loss="cross_entropy")
    with Client() as client:
        run = client.start_run(
            problem,
            start,
            method="newton_cg",
            cg_max_iterations=30,
            stopping={"max_iterations": 12},
            name="conv1d-digits",
        )
        result = run.result(timeout=600)
    params = torch.as_tensor(result.params)
    server_loss = result.info.last_record.loss
    local_loss = mean_cross_entropy(params, X[train], y[train])
    accuracy = {
        name: float((logits(params, X[rows]).argmax(1) == y[rows]).double().mean())
        for name, rows in (("train", train), ("test", test))
    }
    print(f"parameters: {n_params}, iterations: {result.info.last_record.iteration}")
    print(f"start loss: {mean_cross_entropy(start, X[train], y[train]):.6f}")
    print(f"server loss: {server_loss:.12e}")
    print(f"local loss: {local_loss:.12e}")
    print(f"train accuracy: {accuracy['train']:.4f}")
    print(f"test accuracy: {accuracy['test']:.4f}")
