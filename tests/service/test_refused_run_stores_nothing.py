"""A refused StartRun (or StartAndWatchRun) stores nothing: its inline problem is kept only
once the run is accepted. Before, the problem was stored before the options, criteria and
starting point were checked, so every refusal left a problem behind (counted against
--max-problem-bytes, deletable, never used)."""

from __future__ import annotations

import numpy as np
import pytest
from hessian_client import InvalidArgument, NotFound, ResourceExhausted, problems
from hessian_service.server.problems import problem_id

REFUSALS = [
    ({"learning_rate": -1.0}, InvalidArgument),
    ({"stopping": {"max_iterations": -1}}, InvalidArgument),
    ({"params": np.zeros(3)}, InvalidArgument),  # the problem has 5 parameters
    ({"method": "gauss_newton_cg"}, InvalidArgument),  # a quadratic has no Gauss-Newton form
    ({"method": "newton", "dense_budget_bytes": 8}, ResourceExhausted),
    ({"method": "newton", "step_policy": "trust_region"}, InvalidArgument),
]


def _fresh_problem(rng) -> object:
    """A problem no other test stores (fresh random data: its id is new)."""
    m = rng.standard_normal((5, 5))
    return problems.quadratic(m @ m.T + np.eye(5), rng.standard_normal(5))


@pytest.mark.parametrize("watch", [False, True], ids=["StartRun", "StartAndWatchRun"])
@pytest.mark.parametrize("refusal, error", REFUSALS)
def test_a_refused_run_leaves_no_problem_stored(client, rng, watch, refusal, error):
    problem = _fresh_problem(rng)
    options = dict(refusal)
    params = options.pop("params", np.zeros(5))
    with pytest.raises(error):
        client.start_run(problem, params, watch=watch, **options)
    with pytest.raises(NotFound):
        client.delete_problem(problem_id(problem))


def test_an_accepted_run_keeps_its_problem(client, rng):
    problem = _fresh_problem(rng)
    run = client.start_run(problem, np.zeros(5), stopping={"max_iterations": 3})
    run.result()
    assert client.delete_problem(problem_id(problem)) is True
