"""SciPy's Rosenbrock test problem minimised by the server, the caller evaluating it.

scipy.optimize.rosen / rosen_der / rosen_hess / rosen_hess_prod run here; the server runs
the method over one Optimize stream (`hessian_client.minimize`, SciPy's calling
convention). Prints one line per method: final loss, iterations and evaluation counts.
"""

import numpy as np
from hessian_client import minimize
from scipy.optimize import rosen, rosen_der, rosen_hess, rosen_hess_prod

x0 = np.array([1.3, 0.7, 0.8, 1.9, 1.2, 0.4, 1.6, 0.9, 1.1, 0.5])
for method, curvature in [
    ("newton", {"hess": rosen_hess}),
    ("levenberg_marquardt", {"hess": rosen_hess}),
    ("saddle_free", {"hess": rosen_hess}),
    ("newton_cg", {"hessp": rosen_hess_prod}),
]:
    res = minimize(rosen, x0, jac=rosen_der, method=method, **curvature)
    print(
        f"{method}: fun={res.fun:.3e} nit={res.nit} nfev={res.nfev} njev={res.njev} "
        f"nhev={res.nhev} success={res.success} max|x-1|={np.max(np.abs(res.x - 1)):.3e}"
    )
