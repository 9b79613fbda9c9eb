"""The README's tour: fit a logistic regression with Newton's method, watching each record.

Run a server (`make run`), then `python examples/tour.py` ($HESSIAN_ADDRESS names another).
"""

import numpy as np
from hessian_client import Client, problems

rng = np.random.default_rng(0)
X = rng.normal(size=(500, 5))
y = (X @ [1.5, -2.0, 0.5, 0.0, 1.0] + 0.5 * rng.normal(size=500) > 0).astype(np.float64)

with Client() as client:  # address from $HESSIAN_ADDRESS, else 127.0.0.1:50051
    info = client.info()
    print(f"server {info.version} (API {info.api_version}), backend {info.default_backend}")
    problem_id = client.create_problem(problems.logistic_regression(X, y, l2=1e-3))
    run = client.start_run(
        problem_id,
        np.zeros(6),  # 5 weights, then the intercept
        method="newton",
        step_policy="line_search",
        stopping={"max_iterations": 25},
        name="tour",
    )
    for record in run.stream():  # each record arrives as soon as the server computes it
        print(f"it {record.iteration:2d}  loss {record.loss:.8f}  |g| {record.gradient_norm:.2e}")
    result = run.result()
    print(run.id, result.status, result.info.stop_reason, result.params.round(3))
