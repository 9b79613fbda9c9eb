"""A non-ML objective: fit a damped oscillation a exp(-b t) cos(w t + phi) to noisy samples
with Gauss-Newton (Levenberg-Marquardt) on the server. The model is exported as
`outputs(params, t)` and the server applies the catalogue mse loss against `y`, which gives
the objective its Gauss-Newton form (needs torch: pip install 'hessian-client[torch]').
"""

from __future__ import annotations

import numpy as np
import torch
from hessian_client import Client, problems

TRUE = (2.0, 0.3, 3.0, 0.5)  # a, b, w, phi


def oscillation(params: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a exp(-b t) cos(w t + phi) at every sample time."""
    a, b, w, phi = params[0], params[1], params[2], params[3]
    return a * torch.exp(-b * t) * torch.cos(w * t + phi)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    t = np.linspace(0.0, 10.0, 200)
    y = oscillation(torch.tensor(TRUE), torch.tensor(t)).numpy() + 0.02 * rng.normal(size=t.size)
    start = torch.tensor([1.5, 0.2, 2.9, 0.3], dtype=torch.float64)
    problem = problems.exported(oscillation, start, {"t": t, "y": y}, loss="mse")
    with Client() as client:
        run = client.start_run(
            problem,
            start,
            method="newton",
            curvature="gauss_newton",
            step_policy="levenberg_marquardt",
            stopping={"max_iterations": 50},
            name="curve-fit",
        )
        result = run.result(timeout=300)
    fitted = np.asarray(result.params)
    print(f"stop: {result.info.stop_reason}")
    print("fitted: " + " ".join(f"{v:.10f}" for v in fitted))
    print(f"loss: {result.info.last_record.loss:.12e}")
