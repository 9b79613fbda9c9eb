"""Hand-written torch twins of the catalogue objectives, exported as programs, for tests.

Each twin is written here from the objective's documented formula (not by calling the
engine), so parity with the catalogue is an independent check of the exported path.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import zipfile
from collections.abc import Callable, Iterator

import torch
from hessian_client import problems
from hessian_service.engine import Objective, make_objective


def _linear(params, X, d, intercept):
    z = X @ params[:d]
    return z + params[d] if intercept else z


def twin(objective: Objective):
    """(fn(params, **data) -> loss, loss name for a Gauss-Newton twin or '') for `objective`."""
    o = objective.options
    name = objective.name
    if name == "mse":
        return lambda params, target: torch.mean((params.reshape(-1) - target.reshape(-1)) ** 2)
    if name == "least_squares":
        d = objective.data["X"].shape[1]

        def least_squares(params, X, y):
            r = _linear(params, X, d, o["fit_intercept"]) - y
            return 0.5 * torch.mean(r * r) + 0.5 * o["l2"] * torch.sum(params[:d] ** 2)

        return least_squares
    if name == "logistic_regression":
        d = objective.data["X"].shape[1]

        def logistic(params, X, y):
            z = _linear(params, X, d, o["fit_intercept"])
            data = torch.mean(torch.logaddexp(torch.zeros_like(z), z) - y * z)
            return data + 0.5 * o["l2"] * torch.sum(params[:d] ** 2)

        return logistic
    if name == "softmax_regression":
        d, k = objective.data["X"].shape[1], objective.param_shape[1]

        def softmax(params, X, labels):
            w = params.reshape(-1, k)
            z = X @ w[:d] + (w[d] if o["fit_intercept"] else 0.0)
            picked = z.gather(1, labels.unsqueeze(1)).squeeze(1)
            data = torch.mean(torch.logsumexp(z, dim=1) - picked)
            return data + 0.5 * o["l2"] * torch.sum(w[:d] ** 2)

        return softmax
    if name == "mlp":
        sizes = o["layer_sizes"]

        def mlp(params, X, y):
            h, offset = X, 0
            for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
                w = params[offset : offset + fan_in * fan_out].reshape(fan_out, fan_in)
                offset += fan_in * fan_out
                b = params[offset : offset + fan_out]
                offset += fan_out
                h = torch.nn.functional.linear(h, w, b)
                if i < len(sizes) - 2:
                    h = torch.tanh(h)
            return torch.mean((h - y) ** 2) + 0.5 * o["l2"] * torch.sum(params * params)

        return mlp
    if name == "rosenbrock":

        def rosenbrock(params):
            x0, x1 = params[:-1], params[1:]
            return torch.sum(100.0 * (x1 - x0**2) ** 2 + (1.0 - x0) ** 2)

        return rosenbrock
    if name == "quadratic":
        return lambda params, A, b: 0.5 * params @ (A @ params) - b @ params
    raise AssertionError(name)


def exported_twin(objective: Objective, params: torch.Tensor) -> Objective:
    """The catalogue objective's twin, exported through the SDK and built by the engine."""
    problem = problems.exported(twin(objective), params, dict(objective.data))
    return from_problem(problem)


def from_problem(problem, compile: bool = False) -> Objective:
    """Build the engine objective of an SDK `exported` problem without a server (`compile`:
    the server's --exported-compile)."""
    from hessian_service.server.codec import decode_tensor

    spec = problem.exported
    data = {k: decode_tensor(v, f"data.{k}") for k, v in problem.data.items()}
    options = {
        "program": spec.program,
        "param_shape": list(spec.param_shape),
        "output_loss": spec.output_loss,
        "target": spec.target,
        "compile": compile,
    }
    return make_objective("exported", data, options)


def edited_archive(blob: bytes, suffix: str, edit: Callable[[dict], None]) -> bytes:
    """The exported archive `blob` with its JSON member ending in `suffix` changed by `edit`
    (how a hostile or damaged archive is made)."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        files = {name: z.read(name) for name in z.namelist()}
    (name,) = [n for n in files if n.endswith(suffix)]
    doc = json.loads(files[name])
    edit(doc)
    files[name] = json.dumps(doc).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for member, raw in files.items():
            z.writestr(member, raw)
    return out.getvalue()


@contextlib.contextmanager
def past_the_sdks_mode_check(monkeypatch) -> Iterator[None]:
    """problems.exported without its refusal of training-mode modules (BatchNorm statistics,
    dropout): the program a caller without the SDK's check would send the server."""
    with monkeypatch.context() as patched:
        patched.setattr(torch.nn.modules.batchnorm, "_NormBase", type("Unseen", (), {}))
        patched.setattr(torch.nn.modules.dropout, "_DropoutNd", type("Unseen", (), {}))
        yield
