"""A run's end point is judged (end_point) only where the first-order condition holds: a run
stopped by max_iterations far from a stationary point said "minimum" from the curvature
alone (Rosenbrock after 3 Newton iterations, max|g| = 10.6)."""

from __future__ import annotations

import torch
from hessian_service.engine import MethodOptions, Run, StopCriteria, StopReason, make_objective


def test_a_run_stopped_away_from_a_stationary_point_claims_no_end_point(rng):
    objective = make_objective("rosenbrock", {}, {"dim": 6})
    x0 = torch.from_numpy(rng.uniform(-2.0, 2.0, 6))
    run = Run(objective, x0, MethodOptions(method="newton"), StopCriteria(max_iterations=2))
    records = list(run)
    assert run.stop_reason is StopReason.MAX_ITERATIONS
    assert records[-1].gradient_max_norm > 1e-3  # not a stationary point
    assert records[-1].end_point == ""
    # the curvature count is still reported: the Hessian there is what it is
    h = torch.autograd.functional.hessian(lambda v: objective.loss(v), run.params)
    assert records[-1].negative_eigenvalues == int((torch.linalg.eigvalsh(h) < 0).sum())
    # the same run carried to its gradient tolerance judges that stationary point
    done = Run(objective, x0, MethodOptions(method="newton"), StopCriteria(max_iterations=200))
    last = list(done)[-1]
    assert done.stop_reason is StopReason.GRADIENT_TOLERANCE
    assert last.end_point == "minimum" and last.negative_eigenvalues == 0
