"""Module buffers in exported programs: BatchNorm running statistics (eval mode) travel as
raw-byte weights and are read as constants; what would mutate them, or a weight that is a
parameter, is refused."""

from __future__ import annotations

import pytest
import torch
from exported_programs import edited_archive, from_problem, past_the_sdks_mode_check
from hessian_client import problems
from hessian_service.engine.curvature.autograd import hessian, loss_and_grad
from hessian_service.engine.errors import ValidationError
from hessian_service.engine.objectives.export_verify import load_program

F64 = torch.float64
REL = 1e-12


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    """|a - b| <= rel * max|b| elementwise."""
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) <= rel * scale


def batchnorm_net() -> torch.nn.Module:
    """Linear -> BatchNorm1d (eval, random running stats) -> tanh -> Linear, float64."""
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def reference_loss(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor):
    """mse of `net` (its buffers as they are) at flat params: the unexported float64 twin."""
    shapes = [(name, p.shape) for name, p in net.named_parameters()]

    def loss(params: torch.Tensor) -> torch.Tensor:
        values, at = {}, 0
        for name, shape in shapes:
            values[name] = params[at : at + shape.numel()].reshape(shape)
            at += shape.numel()
        out = torch.func.functional_call(net, values, (X,))
        return torch.mean((out - y) ** 2)

    return loss


@pytest.mark.parametrize("compile_", [False, True])
def test_batchnorm_buffers_in_eval_mode_match_the_module(compile_: bool) -> None:
    """Loss, gradient and Hessian of the exported BatchNorm net equal torch.func on the
    module itself at fresh random params (1e-12 relative), interpreted and compiled."""
    net = batchnorm_net()
    X, y = torch.randn(10, 4, dtype=F64), torch.randn(10, 2, dtype=F64)
    problem = problems.exported(net, None, {"X": X, "y": y}, loss="mse")
    objective = from_problem(problem, compile=compile_)
    reference = reference_loss(net, X, y)
    x = torch.randn(objective.num_params, dtype=F64)
    loss, grad = loss_and_grad(objective, x)
    ref_grad, ref_loss = torch.func.grad_and_value(reference)(x)
    assert close(loss, ref_loss) and close(grad, ref_grad)
    assert close(hessian(objective, x), torch.func.hessian(reference)(x))


def test_batchnorm_in_training_mode_is_refused(monkeypatch) -> None:
    """Training mode updates the running stats: refused at the first in-place update (the
    program made past the SDK's own refusal, as a caller without it would send it)."""
    net = batchnorm_net().train()
    X, y = torch.randn(10, 4, dtype=F64), torch.randn(10, 2, dtype=F64)
    with past_the_sdks_mode_check(monkeypatch):
        problem = problems.exported(net, None, {"X": X, "y": y}, loss="mse")
    with pytest.raises(ValidationError, match=r"node 'add_' .* is not allowed"):
        load_program(problem.exported.program)


def edited(member_suffix: str, edit) -> bytes:
    """The eval-mode BatchNorm net's archive with one JSON member changed by `edit`."""
    net = batchnorm_net()
    X, y = torch.randn(10, 4, dtype=F64), torch.randn(10, 2, dtype=F64)
    blob = problems.exported(net, None, {"X": X, "y": y}, loss="mse").exported.program
    return edited_archive(blob, member_suffix, edit)


def test_a_weight_marked_as_parameter_is_refused() -> None:
    """A weights entry with is_param true is a parameter smuggled in as a constant."""

    def mark(config: dict) -> None:
        next(iter(config["config"].values()))["is_param"] = True

    with pytest.raises(ValidationError, match="no parameters among the weights"):
        load_program(edited("model_weights_config.json", mark))


def test_batch_norm_node_with_training_true_is_refused() -> None:
    """A batch_norm node switched to training=True would write its running stats."""

    def train(doc: dict) -> None:
        (node,) = [n for n in doc["graph_module"]["graph"]["nodes"] if "batch_norm" in n["target"]]
        (flag,) = [i for i in node["inputs"] if i["name"] == "training"]
        flag["arg"] = {"as_bool": True}

    with pytest.raises(ValidationError, match="batch_norm in eval mode"):
        load_program(edited("models/model.json", train))


def test_a_module_in_training_mode_that_updates_its_statistics_is_refused_by_the_sdk():
    """BatchNorm in training mode updates its running statistics at every call: the program
    was refused by the server naming only the ATen node ('add_' is not allowed); the SDK
    refuses it first, saying to call .eval()."""
    from hessian_client import InvalidArgument

    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    ).double()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    with pytest.raises(InvalidArgument) as err:
        problems.exported(net, None, {"X": X, "y": y}, loss="mse")
    assert err.value.field == "fn_or_module" and ".eval()" in str(err.value)
    assert "submodule '1' updates its running statistics" in str(err.value)
    problems.exported(net.eval(), None, {"X": X, "y": y}, loss="mse")  # taken in eval mode
