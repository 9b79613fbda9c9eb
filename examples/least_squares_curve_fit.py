"""A least-squares curve fit with SciPy least_squares' convention, the server as the solver.

Model y = a exp(-b t) + c. The caller writes the residuals r and their Jacobian J; the
server minimises |r|^2 / 2 with Levenberg-Marquardt on J^T J, asking for the loss, J^T r
and Gauss-Newton products J^T (J v) that hessian_client forms here. Prints the fitted
(a, b, c), the final cost and the counts.
"""

import numpy as np
from hessian_client import least_squares

rng = np.random.default_rng(0)
t = np.linspace(0.0, 4.0, 200)
truth = np.array([2.5, 1.3, 0.5])
y = truth[0] * np.exp(-truth[1] * t) + truth[2] + 0.01 * rng.standard_normal(t.size)


def residuals(p: np.ndarray) -> np.ndarray:
    return p[0] * np.exp(-p[1] * t) + p[2] - y


def jacobian(p: np.ndarray) -> np.ndarray:
    e = np.exp(-p[1] * t)
    return np.stack([e, -p[0] * t * e, np.ones_like(t)], axis=1)


res = least_squares(residuals, np.array([1.0, 1.0, 0.0]), jacobian, gtol=1e-10)
print(f"fit: a={res.x[0]:.6f} b={res.x[1]:.6f} c={res.x[2]:.6f} cost={res.cost:.10e}")
print(f"success={res.success} nit={res.nit} nfev={res.nfev} njev={res.njev} run_id={res.run_id}")
