"""A trial point where an exported program raises is a rejected trial, not a failed run."""

from __future__ import annotations

import pytest
import torch
from exported_programs import from_problem
from hessian_client import problems
from hessian_service.engine import MethodOptions, Run, StopCriteria
from hessian_service.engine.errors import EvaluationError

F64 = torch.float64
ROWS = 4


def indexed(params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A quadratic with minimum at 10 plus a row of X picked by int(params[0]): the
    program raises wherever params[0] >= ROWS."""
    return ((params - 10.0) ** 2).sum() + X.index_select(0, params[:1].long()).sum()


def test_line_search_rejects_trials_where_the_program_raises() -> None:
    """Newton from 0 aims at 10: the trials at ~10 and ~5 raise (rows 0..3 only), so Armijo
    backtracking (halving) accepts the third, ~2.5, whose loss is the float64 formula's."""
    X = torch.randn(ROWS, 3, dtype=F64)
    objective = from_problem(problems.exported(indexed, torch.zeros(3, dtype=F64), {"X": X}))
    options = MethodOptions(method="newton", step_policy="line_search", backend="autograd")
    records = Run(
        objective, torch.zeros(3, dtype=F64), options, StopCriteria(max_iterations=1)
    ).run_to_end()
    first, last = records[0], records[-1]
    assert first.step_accepted and first.step_size == 0.25 and first.function_evaluations == 3
    expected = 3 * (10.0 - 2.5) ** 2 + float(X[2].sum())
    assert last.loss == pytest.approx(expected, rel=1e-9)


def test_a_direct_evaluation_that_raises_still_names_the_node() -> None:
    """Outside a trial the error stays: INVALID_ARGUMENT naming the node."""
    X = torch.randn(ROWS, 3, dtype=F64)
    objective = from_problem(problems.exported(indexed, torch.zeros(3, dtype=F64), {"X": X}))
    with pytest.raises(EvaluationError, match="node 'index_select'"):
        objective.loss(torch.full((3,), 7.0, dtype=F64))
