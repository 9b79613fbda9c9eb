"""The data the curve-fit examples fit: y = a exp(-b t) + c, (a, b, c) = (2.5, 1.3, 0.5), at
200 points t in [0, 4] with N(0, 0.01^2) noise; the residuals r(p) and their Jacobian J(p)
are what a caller writes for it."""

import numpy as np

rng = np.random.default_rng(0)
t = np.linspace(0.0, 4.0, 200)
truth = np.array([2.5, 1.3, 0.5])
y = truth[0] * np.exp(-truth[1] * t) + truth[2] + 0.01 * rng.standard_normal(t.size)


def residuals(p: np.ndarray) -> np.ndarray:
    """r(p) = a exp(-b t) + c - y for p = (a, b, c)."""
    return p[0] * np.exp(-p[1] * t) + p[2] - y


def jacobian(p: np.ndarray) -> np.ndarray:
    """J(p) = dr/dp, one row per point: (exp(-b t), -a t exp(-b t), 1)."""
    e = np.exp(-p[1] * t)
    return np.stack([e, -p[0] * t * e, np.ones_like(t)], axis=1)
