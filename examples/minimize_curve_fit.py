"""A least-squares curve fit with a hand-written Jacobian, the server as the optimiser.

Model y = a exp(-b t) + c. The caller writes the residuals r and their Jacobian J (in
curve_fit_data.py, shared with least_squares_curve_fit.py); the loss is |r|^2 / 2, its
gradient J^T r, and `hessp` gives Gauss-Newton products J^T (J v), so Newton-CG on the
server runs Gauss-Newton-CG without ever forming J^T J.
Prints the fitted (a, b, c) and the final loss.
"""

import numpy as np
from curve_fit_data import jacobian, residuals  # y = a exp(-b t) + c, 200 noisy points
from hessian_client import minimize


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
