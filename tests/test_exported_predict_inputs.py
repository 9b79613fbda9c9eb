"""Predict and problems.exported as a user of exported programs meets them: integer row
inputs (embedding indices) were refused as new rows while float ones were truncated to
indices without a word, a row input not named X could not take new rows, two row inputs
broke inside the graph, a module with a non-persistent buffer was refused, int32 data made
a problem its own server refused, and a few mistakes raised bare Python errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from exported_programs import from_problem
from hessian_client import InvalidArgument, problems
from hessian_service.engine.curvature.autograd import loss_and_grad
from hessian_service.engine.errors import ValidationError

F64 = torch.float64


def embedded(params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return F.embedding(X, params.reshape(10, 2)).sum(1)


@pytest.fixture()
def embedding_problem(rng):
    idx = torch.from_numpy(rng.integers(0, 10, size=(30, 2)))
    problem = problems.exported(embedded, torch.zeros(20, dtype=F64),
                                {"X": idx, "y": torch.zeros(30, 2, dtype=F64)},
                                loss="mse", rows=["X"])  # fmt: skip
    return from_problem(problem), torch.from_numpy(rng.normal(size=20))


def test_integer_rows_are_predicted_on_as_the_program_reads_them(embedding_problem, rng):
    objective, w = embedding_problem
    new = torch.from_numpy(rng.integers(0, 10, size=(7, 2)))
    torch.testing.assert_close(objective.predict(w, new), embedded(w, new), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [[[2.7, 3.2]], [[-0.5, 0.0]]])
def test_float_rows_for_integer_inputs_are_refused_not_truncated(embedding_problem, rows):
    objective, w = embedding_problem
    with pytest.raises(ValidationError) as err:  # 2.7 was read as index 2
        objective.predict(w, torch.tensor(rows, dtype=F64))
    assert err.value.field == "inputs.dtype" and "integers" in str(err.value)


def test_an_index_past_the_table_in_new_rows_is_named_as_the_inputs(embedding_problem):
    objective, w = embedding_problem
    with pytest.raises(ValidationError) as err:
        objective.predict(w, torch.tensor([[11, 0]]))
    assert err.value.field == "inputs" and "IndexError" in str(err.value)


def test_a_row_input_of_any_name_takes_new_rows(rng):
    x = torch.from_numpy(rng.normal(size=(40, 3)))
    problem = problems.exported(lambda params, idx: idx @ params.reshape(3, 1),
                                torch.zeros(3, dtype=F64),
                                {"idx": x, "y": torch.from_numpy(rng.normal(size=(40, 1)))},
                                loss="mse", rows=["idx"])  # fmt: skip
    objective = from_problem(problem)
    w = torch.from_numpy(rng.normal(size=3))
    new = torch.from_numpy(rng.normal(size=(7, 3)))
    torch.testing.assert_close(objective.predict(w, new), new @ w.reshape(3, 1))


def test_two_row_inputs_refuse_new_rows_naming_the_inputs(rng):
    x, z = (torch.from_numpy(rng.normal(size=(40, k))) for k in (3, 1))
    problem = problems.exported(lambda params, X, Z: X @ params.reshape(3, 1) + Z,
                                torch.zeros(3, dtype=F64),
                                {"X": x, "Z": z, "y": torch.from_numpy(rng.normal(size=(40, 1)))},
                                loss="mse", rows=["X", "Z"])  # fmt: skip
    objective = from_problem(problem)
    w = torch.from_numpy(rng.normal(size=3))
    with pytest.raises(ValidationError) as err:  # it failed inside the graph, "problem.exported"
        objective.predict(w, x[:5])
    assert err.value.field == "inputs" and "['X', 'Z']" in str(err.value)
    torch.testing.assert_close(objective.predict(w), x @ w.reshape(3, 1) + z)  # its own rows


class Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 0.5]), persistent=False)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.linear(X * self.scale)


def test_a_module_s_non_persistent_buffer_travels_as_a_constant(rng):
    module = Scaled().double().eval()
    x = torch.from_numpy(rng.normal(size=(40, 3)))
    y = torch.from_numpy(rng.normal(size=(40, 1)))
    objective = from_problem(problems.exported(module, None, {"X": x, "y": y}, loss="mse"))
    p = torch.from_numpy(rng.normal(size=4))

    def reference(p: torch.Tensor) -> torch.Tensor:
        return (((x * module.scale) @ p[:3] + p[3] - y[:, 0]) ** 2).mean()

    loss, grad = loss_and_grad(objective, p)
    torch.testing.assert_close(loss, reference(p), rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, torch.func.grad(reference)(p), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_integer_data_of_any_width_is_exported_as_the_wire_carries_it(rng, dtype):
    idx = torch.from_numpy(rng.integers(0, 10, size=(30, 2))).to(dtype)
    data = {"X": idx, "y": torch.zeros(30, 2, dtype=F64)}
    problem = problems.exported(embedded, torch.zeros(20, dtype=F64), data, loss="mse")
    objective = from_problem(problem)  # int32 data: "expected torch.int32 ..., got torch.int64"
    w = torch.from_numpy(rng.normal(size=20))
    torch.testing.assert_close(objective.outputs(w), embedded(w, idx.long()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_data_is_refused_naming_the_field(rng, dtype):
    """Complex data went through the integer cast: imaginary parts dropped, real parts
    truncated, and a loss of 0 answered for |Z p|^2 at p = 1 (7.58 with the real data)."""
    z = torch.from_numpy(rng.normal(size=4) + 1j * rng.normal(size=4)).to(dtype)
    with pytest.raises(InvalidArgument) as caught:
        problems.exported(lambda p, Z: (Z * p).abs().square().sum(), torch.ones(4), {"Z": z})
    assert caught.value.field == "data.Z"
    assert "expected real values (float32, float64 or integers)" in str(caught.value)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: problems.exported(lambda p, **d: p.sum(), np.zeros(3), {"params": np.zeros(3)}),
         "data.params"),
        (lambda: problems.exported(lambda p, **d: p.sum(), np.zeros(3), {"self": np.zeros(3)}),
         "data.self"),
        (lambda: problems.exported(lambda p, X: p.sum(), {"W": np.zeros(2)}, {"X": np.zeros(3)}),
         "example_params"),
        (lambda: problems.exported(lambda p, X: p.sum(), (torch.zeros(2), torch.zeros(1)),
                                   {"X": np.zeros(3)}), "example_params"),
        (lambda: problems.exported(torch.nn.Linear(3, 1).double(), torch.zeros(2, dtype=F64),
                                   {"X": np.zeros((4, 3)), "y": np.zeros((4, 1))}, loss="mse"),
         "example_params"),
    ],
)  # fmt: skip
def test_a_mistake_in_problems_exported_is_named(call, field):
    with pytest.raises(InvalidArgument) as err:  # TypeError / RuntimeError naming nothing
        call()
    assert err.value.field == field
