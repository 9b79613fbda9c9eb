"""Exported programs with a symbolic row count (`problems.exported(..., rows=...)`): mini-batches
and Predict on new rows, against float64 references and the catalogue mlp."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from exported_programs import edited_archive, from_problem
from hessian_client import problems
from hessian_service.engine import MethodOptions, Run, StopCriteria
from hessian_service.engine.curvature.autograd import loss_and_grad
from hessian_service.engine.errors import ValidationError
from hessian_service.engine.objectives.export_verify import load_program
from problems import random_params, random_problem

F64 = torch.float64
REL = 1e-12


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    """|a - b| <= rel * max|b| elementwise."""
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) <= rel * scale


def mlp_outputs(sizes: list[int]):
    """The catalogue mlp's forward (tanh hidden layers) on flat params."""

    def outputs(params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        h, at = X, 0
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            w = params[at : at + fan_in * fan_out].reshape(fan_out, fan_in)
            at += fan_in * fan_out
            h = torch.nn.functional.linear(h, w, params[at : at + fan_out])
            at += fan_out
            h = torch.tanh(h) if i < len(sizes) - 2 else h
        return h

    return outputs


def linear_mse(params: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.mean((torch.tanh(X @ params.reshape(4, 2)) - y) ** 2)


def test_a_mini_batch_is_the_loss_on_its_rows() -> None:
    """rows=(X, y): the objective's row fields; a subsample's loss and gradient equal
    torch.func's on those rows (1e-12), and the full problem's on all rows."""
    X, y = torch.randn(20, 4, dtype=F64), torch.randn(20, 2, dtype=F64)
    x = torch.randn(8, dtype=F64)
    objective = from_problem(problems.exported(linear_mse, x, {"X": X, "y": y}, rows=("X", "y")))
    assert objective.row_fields == ("X", "y") and objective.num_rows == 20
    picked = torch.randperm(20)[:7]
    for obj, (Xs, ys) in [
        (objective, (X, y)),
        (objective.subsample(picked), (X[picked], y[picked])),
    ]:
        loss, grad = loss_and_grad(obj, x)
        ref_grad, ref_loss = torch.func.grad_and_value(linear_mse)(x, Xs, ys)
        assert close(loss, ref_loss) and close(grad, ref_grad)


def test_predict_on_new_rows_of_another_count() -> None:
    """Gauss-Newton form with rows=(X,): Predict on 13 new rows (the problem has 24) gives
    the plain function's outputs on them."""
    catalogue = random_problem("mlp", size=4)
    sizes = catalogue.options["layer_sizes"]
    x = random_params(catalogue)
    problem = problems.exported(
        mlp_outputs(sizes), x, dict(catalogue.data), loss="mse", rows=("X",)
    )
    objective = from_problem(problem)
    assert objective.row_fields == ("X", "y")
    new = torch.randn(13, sizes[0], dtype=F64)
    assert close(objective.predict(x, new), mlp_outputs(sizes)(x, new))


def test_mini_batch_runs_repeat_the_catalogue_mlp() -> None:
    """Newton-CG with curvature and gradient fractions 0.5 (same seed, same rows drawn):
    the exported twin's records are the catalogue mlp's."""
    catalogue = random_problem("mlp", size=4)
    sizes = catalogue.options["layer_sizes"]
    x = random_params(catalogue)
    problem = problems.exported(
        mlp_outputs(sizes), x, dict(catalogue.data), loss="mse", rows=("X",)
    )
    twin = from_problem(problem)
    options = MethodOptions(
        method="newton_cg",
        curvature_fraction=0.5,
        gradient_fraction=0.5,
        seed=3,
        backend="autograd",
    )
    stop = StopCriteria(max_iterations=3)
    ours = Run(twin, x, options, stop).run_to_end()
    ref = Run(catalogue, x, options, stop).run_to_end()
    assert [r.iteration for r in ours] == [r.iteration for r in ref]
    for a, b in zip(ours, ref, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-9, abs=1e-14)
        assert a.gradient_batch_size == b.gradient_batch_size
    assert ours[0].gradient_batch_size == twin.num_rows // 2


def _rows_archive() -> bytes:
    X, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 2, dtype=F64)
    problem = problems.exported(
        linear_mse, torch.zeros(8, dtype=F64), {"X": X, "y": y}, rows=("X", "y")
    )
    return problem.exported.program


def _sizes(doc: dict) -> list[dict]:
    return [s for v in doc["graph_module"]["graph"]["tensor_values"].values() for s in v["sizes"]]


def test_a_size_expression_is_refused() -> None:
    """Only a bare symbol is a row count: an expression (never evaluated) is refused."""

    def expression(doc: dict) -> None:
        for size in _sizes(doc):
            if "as_expr" in size:
                size["as_expr"]["expr_str"] += " + 1"

    with pytest.raises(ValidationError, match="a row count at most"):
        load_program(edited_archive(_rows_archive(), "models/model.json", expression))


def test_two_symbols_are_refused() -> None:
    """One symbolic size at most: a second symbol is refused, naming both."""

    def second(doc: dict) -> None:
        symbolic = [s for s in _sizes(doc) if "as_expr" in s]
        expr = symbolic[-1]["as_expr"]
        expr["expr_str"] = expr["expr_str"].replace("Symbol('", "Symbol('t")

    with pytest.raises(ValidationError, match="at most one symbolic size"):
        load_program(edited_archive(_rows_archive(), "models/model.json", second))


def test_rows_naming_no_input_is_refused_by_the_sdk() -> None:
    X, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 2, dtype=F64)
    with pytest.raises(ValueError, match="rows"):
        problems.exported(linear_mse, torch.zeros(8, dtype=F64), {"X": X, "y": y}, rows=("Z",))


def test_mini_batches_in_threads_equal_solo_and_reuse_bindings() -> None:
    """8 threads evaluate mini-batches of 5 sizes (more than the bindings kept): losses and
    gradients equal the same calls alone bit for bit; a recurring size reuses its binding."""
    X, y = torch.randn(20, 4, dtype=F64), torch.randn(20, 2, dtype=F64)
    x = torch.randn(8, dtype=F64)
    objective = from_problem(problems.exported(linear_mse, x, {"X": X, "y": y}, rows=("X", "y")))
    template = objective._template
    assert template.for_rows(9) is template.for_rows(9)
    jobs = [torch.randperm(20)[: 3 + i % 5] for i in range(24)]

    def work(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_and_grad(objective.subsample(rows), x)

    solo = [work(rows) for rows in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(work, jobs))
    for (l1, g1), (l2, g2) in zip(solo, together, strict=True):
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
