"""A least-squares curve fit with a hand-written Jacobian, the server as the optimiser.

Model y = a exp(-b t) + c. The caller writes the residuals r and their Jacobian J; the
loss is |r|^2 / 2, its gradient J^T r, and `hessp` gives Gauss-Newton products
J^T (J v), so Newton-CG on the server runs Gauss-Newton-CG without ever forming J^T J.
Prints the fitted (a, b, c) and the final loss.
"""

import numpy as np
from hessian_client import minimize

rng = np.random.default_rng(0)
t = np.linspace(0.0, 4.0, 200)
truth = np.array([2.5, 1.3, 0.5])
y = truth[0] * np.exp(-truth[1] * t) + truth[2] + 0.01 * rng.standard_normal(t.size)


def residuals(p: np.ndarray) -> np.ndarray:
    return p[0] * np.exp(-p[1] * t) + p[2] - y


def jacobian(p: np.ndarray) -> np.ndarray:
    e = np.exp(-p[1] * t)
    return np.stack([e, -p[0] * t * e, np.ones_like(t)], axis=1)


def loss_and_grad(p: np.ndarray) -> tuple[float, np.ndarray]:
    r = residuals(p)
    return 0.5 * float(r @ r), jacobian(p).T @ r


def gauss_newton_product(p: np.ndarray, v: np.ndarray) -> np.ndarray:
    j = jacobian(p)
    return j.T @ (j @ v)


res = minimize(
    loss_and_grad,
    np.array([1.0, 1.0, 0.0]),
    jac=True,
    hessp=gauss_newton_product,
    method="newton_cg",
    options={"maxiter": 200, "gtol": 1e-9},
)
print(f"fit: a={res.x[0]:.6f} b={res.x[1]:.6f} c={res.x[2]:.6f} loss={res.fun:.10e}")
print(f"success={res.success} nit={res.nit} run_id={res.run_id}")
