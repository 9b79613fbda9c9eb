"""A least-squares curve fit with SciPy least_squares' convention, the server as the solver.

Model y = a exp(-b t) + c. The caller writes the residuals r and their Jacobian J (in
curve_fit_data.py, shared with minimize_curve_fit.py); the server minimises |r|^2 / 2 with
Levenberg-Marquardt on J^T J, asking for the loss, J^T r and Gauss-Newton products
J^T (J v) that hessian_client forms here. Prints the fitted (a, b, c), the final cost and
the counts.
"""

import numpy as np
from curve_fit_data import jacobian, residuals  # y = a exp(-b t) + c, 200 noisy points
from hessian_client import least_squares

res = least_squares(residuals, np.array([1.0, 1.0, 0.0]), jacobian, gtol=1e-10)
print(f"fit: a={res.x[0]:.6f} b={res.x[1]:.6f} c={res.x[2]:.6f} cost={res.cost:.10e}")
print(f"success={res.success} nit={res.nit} nfev={res.nfev} njev={res.njev} run_id={res.run_id}")
