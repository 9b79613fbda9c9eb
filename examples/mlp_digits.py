"""An mlp on scikit-learn's 8x8 digits, trained by Gauss-Newton CG on the server, then
classes predicted by the server's Predict on held-out rows (needs scikit-learn).

The flat parameters hold, layer by layer, W (out, in) row-major and then b (see the README's
parameter layout table), so `unpack` below is only for looking at the weights.
"""

from __future__ import annotations

import itertools

import numpy as np
from hessian_client import Client, problems
from sklearn.datasets import load_digits

SIZES = [64, 32, 10]


def unpack(params: np.ndarray, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (W, b) of each layer from the flat parameter vector."""
    layers, at = [], 0
    for fan_in, fan_out in itertools.pairwise(sizes):
        w = params[at : at + fan_out * fan_in].reshape(fan_out, fan_in)
        at += fan_out * fan_in
        layers.append((w, params[at : at + fan_out]))
        at += fan_out
    return layers


if __name__ == "__main__":
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float64)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:1200], order[1200:]
    with Client() as client:
        problem = problems.mlp(
            X[train], labels[train], layer_sizes=SIZES, loss="cross_entropy", l2=1e-4
        )
        problem_id = client.create_problem(problem)
        run = client.start_run(
            problem_id,
            seed=0,  # the objective's own initialisation, drawn on the server
            method="gauss_newton_cg",
            cg_max_iterations=50,
            stopping={"max_iterations": 20},
            name="mlp-digits",
        )
        result = run.result(timeout=300)
        last = result.info.last_record
        print(f"{last.iteration} iterations, final loss {last.loss:.4f}")
        logits = client.predict(problem_id, result.params, X[test])
        predicted = logits.argmax(axis=1)
        print("first predicted classes", predicted[:10].tolist())
        print("first true classes     ", labels[test][:10].tolist())
        print("layer shapes", [w.shape for w, _ in unpack(result.params, SIZES)])
        print(f"test accuracy {np.mean(predicted == labels[test]):.3f}")
