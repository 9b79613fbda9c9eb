"""Everyday torch idioms in exported programs: `W.T` (numpy_T), `F.nll_loss` (nll_loss_nd),
`F.huber_loss` / `F.smooth_l1_loss` (broadcast_tensors), `torch.linalg.norm` (linalg_norm)
and `nn.Dropout` in eval mode (the identity) were refused as unknown operators. Each is
compared with the same function under torch.func on fresh float64 data; a training-mode
dropout (random) stays refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from exported_programs import from_problem
from hessian_client import problems
from hessian_service.engine.curvature.autograd import hessian, loss_and_grad
from hessian_service.engine.errors import ValidationError

F64 = torch.float64
REL = 1e-12


def _case(name: str):
    X, y = torch.randn(10, 3, dtype=F64), torch.randn(10, dtype=F64)
    labels = torch.randint(0, 2, (10,))
    if name == "transpose":
        return (lambda p, X: ((X @ p.reshape(2, 3).T) ** 2).mean() + (p**4).sum(),
                torch.randn(6, dtype=F64), {"X": X})  # fmt: skip
    if name == "nll_loss":
        return (lambda p, X, labels: F.nll_loss(F.log_softmax(X @ p.reshape(3, 2), 1), labels),
                torch.randn(6, dtype=F64), {"X": X, "labels": labels})  # fmt: skip
    if name == "huber_loss":
        return (lambda p, X, y: F.huber_loss(X @ p, y, delta=0.5),
                torch.randn(3, dtype=F64), {"X": X, "y": y})  # fmt: skip
    if name == "smooth_l1_loss":
        return (lambda p, X, y: F.smooth_l1_loss(X @ p, y),
                torch.randn(3, dtype=F64), {"X": X, "y": y})  # fmt: skip
    return (lambda p, X, y: torch.linalg.norm(X @ p - y) ** 2,
            torch.randn(3, dtype=F64), {"X": X, "y": y})  # fmt: skip


@pytest.mark.parametrize(
    "name", ["transpose", "nll_loss", "huber_loss", "smooth_l1_loss", "linalg_norm"]
)
def test_an_everyday_idiom_is_accepted_and_exact(name):
    fn, p, data = _case(name)
    objective = from_problem(problems.exported(fn, p, data))
    loss, grad = loss_and_grad(objective, p)
    ref_loss = fn(p, **data)
    ref_grad = torch.func.grad(lambda q: fn(q, **data))(p)
    ref_h = torch.func.hessian(lambda q: fn(q, **data))(p)
    assert abs(float(loss) - float(ref_loss)) <= REL * abs(float(ref_loss))
    assert float((grad - ref_grad).abs().max()) <= REL * float(ref_grad.abs().max())
    h = hessian(objective, p)
    assert float((h - ref_h).abs().max()) <= REL * float(ref_h.abs().max())


class _Dropped(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2).double()
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(X))


def test_dropout_in_eval_mode_is_the_identity_and_in_training_is_refused():
    X, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    net = _Dropped().eval()
    objective = from_problem(problems.exported(net, None, {"X": X, "y": y}, loss="mse"))
    params = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    loss, _ = loss_and_grad(objective, params)
    assert abs(float(loss) - float(((net.linear(X) - y) ** 2).mean())) <= REL
    with pytest.raises(ValidationError, match="dropout in eval mode"):
        from_problem(problems.exported(net.train(), None, {"X": X, "y": y}, loss="mse"))


@pytest.mark.parametrize(
    ("data", "rows", "field"),
    [
        ({"class": torch.ones(4, 2)}, (), "data.class"),  # a keyword: torch's SyntaxError
        ({"X": torch.ones(1, 2)}, ("X",), "data.X"),  # one example row: torch's UserError
    ],
)
def test_inputs_torch_export_cannot_take_are_named_by_the_sdk(data, rows, field):
    from hessian_client import InvalidArgument

    with pytest.raises(InvalidArgument) as err:
        problems.exported(lambda p, **d: (p**2).sum(), torch.zeros(2), data, rows=rows)
    assert err.value.field == field
