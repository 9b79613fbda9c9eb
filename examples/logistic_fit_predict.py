"""A scikit-learn-style estimator over the service: fit() runs Newton on the server,
predict_proba()/predict() call its Predict RPC (no forward pass written here).

`python examples/logistic_fit_predict.py` against a running server.
"""

from __future__ import annotations

import numpy as np
from hessian_client import Client, problems


class NewtonLogisticRegression:
    """Binary logistic regression: mean logistic loss + 0.5 l2 ||w||^2, fitted by Newton."""

    def __init__(self, client: Client, l2: float = 1e-2, max_iterations: int = 50) -> None:
        self.client, self.l2, self.max_iterations = client, l2, max_iterations

    def fit(self, X: np.ndarray, y: np.ndarray) -> NewtonLogisticRegression:
        """Upload the data once, run Newton with a line search to the gradient tolerance."""
        self.problem_id_ = self.client.create_problem(
            problems.logistic_regression(X, y.astype(np.float64), l2=self.l2)
        )
        run = self.client.start_run(
            self.problem_id_,
            np.zeros(X.shape[1] + 1),
            method="newton",
            step_policy="line_search",
            stopping={"max_iterations": self.max_iterations, "gradient_tolerance": 1e-10},
        )
        result = run.result(timeout=120)
        self.n_iter_ = result.info.num_records - 1
        self.coef_, self.intercept_ = result.params[:-1], result.params[-1]
        self.params_ = result.params
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """X w + b, computed by the server's Predict."""
        return self.client.predict(self.problem_id_, self.params_, X)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(y = 1 | x) for each row."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(X)))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The predicted class (0 or 1) of each row."""
        return (self.decision_function(X) > 0).astype(int)


if __name__ == "__main__":
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 4))
    y = (X @ [2.0, -1.0, 0.5, 0.0] + 0.3 + rng.normal(size=600) > 0).astype(int)
    train, test = slice(0, 400), slice(400, 600)
    with Client() as client:
        model = NewtonLogisticRegression(client, l2=1e-2).fit(X[train], y[train])
        accuracy = float(np.mean(model.predict(X[test]) == y[test]))
        print(f"fitted in {model.n_iter_} Newton iterations")
        print("coef", model.coef_.round(4).tolist(), "intercept", round(model.intercept_, 4))
        print("P(y=1) of the first test rows", model.predict_proba(X[test][:3]).round(3))
        print(f"test accuracy {accuracy:.3f}")
