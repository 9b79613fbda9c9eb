"""Exported programs in the engine: parity with the catalogue, Gauss-Newton, evaluation limits."""

from __future__ import annotations

import itertools

import pytest
import torch
from exported_programs import exported_twin, from_problem
from exported_programs import twin as exported_programs_twin
from hessian_client import problems
from hessian_service.engine import MethodOptions, Run, StopCriteria
from hessian_service.engine.cancel import Cancelled, CancelToken, scope
from hessian_service.engine.curvature.autograd import gauss_newton, hessian, hvp, loss_and_grad
from hessian_service.engine.errors import ResourceLimitError
from hessian_service.engine.options import METHOD_STEP_POLICIES
from problems import CATALOGUE, random_params, random_problem

F64 = torch.float64
REL = 1e-12


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    """|a - b| <= rel * max|b| elementwise (relative to the reference's scale)."""
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) <= rel * scale


@pytest.mark.parametrize("name", CATALOGUE)
def test_exported_twin_matches_catalogue_loss_gradient_hessian(name: str) -> None:
    """Loss, gradient and dense Hessian of the exported twin equal the catalogue's (1e-12)."""
    objective = random_problem(name)
    x = random_params(objective)
    twin = exported_twin(objective, x.reshape(objective.param_shape))
    loss, grad = loss_and_grad(twin, x)
    ref_loss, ref_grad = loss_and_grad(objective, x)
    assert close(loss, ref_loss) and close(grad, ref_grad)
    assert close(hessian(twin, x), hessian(objective, x))
    v = torch.randn_like(x)
    assert close(hvp(twin, x, v), hessian(objective, x) @ v, 1e-10)


@pytest.mark.parametrize("name", ["least_squares", "mlp", "quadratic"])
def test_exported_twin_run_records_match_catalogue(name: str) -> None:
    """A few Newton iterations of the twin give the catalogue run's records."""
    objective = random_problem(name)
    x = random_params(objective)
    twin = exported_twin(objective, x.reshape(objective.param_shape))
    options = MethodOptions(method="newton", backend="autograd")
    stop = StopCriteria(max_iterations=4)
    ours = Run(twin, x, options, stop).run_to_end()
    ref = Run(objective, x, options, stop).run_to_end()
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-10, abs=1e-14)
        assert a.gradient_max_norm == pytest.approx(b.gradient_max_norm, rel=1e-8, abs=1e-12)


def test_gauss_newton_of_exported_outputs_matches_float64_reference() -> None:
    """outputs(params, X) with loss='mse': GGN = 2/N J^T J, J of the plain (unexported) fn."""
    n, d = 12, 3
    X = torch.randn(n, d, dtype=F64)
    y = torch.randn(n, dtype=F64)
    x = torch.randn(d + 1, dtype=F64)

    def curve(params, X):
        return torch.exp(-params[0] * X[:, 0]) * params[1] + X[:, 1:] @ params[2:]

    objective = from_problem(problems.exported(curve, x, {"X": X, "y": y}, loss="mse"))
    jac = torch.autograd.functional.jacobian(lambda p: curve(p, X), x)
    _, _, ggn = gauss_newton(objective, x)
    assert close(ggn, 2.0 / n * jac.T @ jac)
    r = curve(x, X) - y
    assert close(objective.loss(x), torch.mean(r * r))


def _mlp_pair():
    """Catalogue mlp (mse) and its exported twin in Gauss-Newton form (outputs + loss mse)."""
    objective = random_problem("mlp", size=4)
    sizes = objective.options["layer_sizes"]

    def outputs(params, X):
        h, offset = X, 0
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            w = params[offset : offset + fan_in * fan_out].reshape(fan_out, fan_in)
            b = params[offset + fan_in * fan_out : offset + fan_in * fan_out + fan_out]
            offset += fan_in * fan_out + fan_out
            h = torch.nn.functional.linear(h, w, b)
            h = torch.tanh(h) if i < len(sizes) - 2 else h
        return h

    x = random_params(objective)
    twin = from_problem(problems.exported(outputs, x, dict(objective.data), loss="mse"))
    return objective, twin, x


METHOD_POLICIES = [(m, p) for m, ps in METHOD_STEP_POLICIES.items() for p in ps]


@pytest.mark.parametrize(("method", "policy"), METHOD_POLICIES)
def test_every_method_and_step_policy_matches_catalogue_mlp(method: str, policy: str) -> None:
    """Each method x step policy gives the catalogue's records on the exported twin."""
    objective, twin, x = _mlp_pair()
    options = MethodOptions(method=method, step_policy=policy, backend="autograd")
    stop = StopCriteria(max_iterations=3)
    ours = Run(twin, x, options, stop).run_to_end()
    ref = Run(objective, x, options, stop).run_to_end()
    assert [r.iteration for r in ours] == [r.iteration for r in ref]
    for a, b in zip(ours, ref, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-9, abs=1e-14)


def test_forward_over_reverse_hvp_mode_matches() -> None:
    """torch.func's vjp-of-grad products (hvp_mode forward_over_reverse) run the interpreter."""
    objective, twin, x = _mlp_pair()
    options = MethodOptions(method="newton_cg", hvp_mode="forward_over_reverse", backend="autograd")
    stop = StopCriteria(max_iterations=3)
    ours = Run(twin, x, options, stop).run_to_end()
    ref = Run(objective, x, options, stop).run_to_end()
    for a, b in zip(ours, ref, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-9, abs=1e-14)


def test_resume_from_checkpoint_continues_identically() -> None:
    """A run of an exported program resumed from a checkpoint repeats the uninterrupted one."""
    _, twin, x = _mlp_pair()
    options = MethodOptions(method="newton", backend="autograd")
    stop = StopCriteria(max_iterations=6)
    full = Run(twin, x, options, stop).run_to_end()
    first = Run(twin, x, options, stop)
    for record in first:
        if record.iteration == 2:
            break
    resumed = Run(twin, x, options, stop, resume=first.checkpoint()).run_to_end()
    assert [(r.iteration, r.loss) for r in resumed] == [(r.iteration, r.loss) for r in full[2:]]


def test_evaluation_past_its_time_limit_is_refused() -> None:
    """An evaluation over the per-evaluation wall-clock limit stops with RESOURCE_EXHAUSTED's
    error naming the limit (a limit in the past: no timing dependence)."""
    _, twin, x = _mlp_pair()
    twin.eval_seconds = -1.0
    with pytest.raises(ResourceLimitError, match="limit of -1 s"):
        twin.loss(x)


def test_cancel_token_stops_an_evaluation() -> None:
    """The request's cancel token is checked between nodes."""
    _, twin, x = _mlp_pair()
    token = CancelToken()
    token.cancel()
    with scope(token), pytest.raises(Cancelled):
        twin.loss(x)


def test_module_with_output_loss_matches_catalogue_mlp() -> None:
    """An nn.Sequential sent through problems.exported(module, ...) with loss='mse' is the
    catalogue mlp (same parameter layout: parameters_to_vector order)."""
    objective = random_problem("mlp", size=4)
    sizes = objective.options["layer_sizes"]
    module = torch.nn.Sequential(
        torch.nn.Linear(sizes[0], sizes[1]), torch.nn.Tanh(), torch.nn.Linear(sizes[1], sizes[2])
    ).double()
    x = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    twin = from_problem(problems.exported(module, None, dict(objective.data), loss="mse"))
    loss, grad = loss_and_grad(twin, x)
    ref_loss, ref_grad = loss_and_grad(objective, x)
    assert close(loss, ref_loss) and close(grad, ref_grad)


def test_concurrent_evaluations_equal_solo_bit_for_bit() -> None:
    """One exported objective shared by 8 threads: gradients and HVPs at different points
    equal the same computations done alone, bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    _, twin, x = _mlp_pair()
    points = [(x + 0.1 * torch.randn_like(x), torch.randn_like(x)) for _ in range(16)]

    def work(pv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_and_grad(twin, pv[0])[1], hvp(twin, pv[0], pv[1])

    solo = [work(pv) for pv in points]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(work, points))
    for (g1, h1), (g2, h2) in zip(solo, together, strict=True):
        assert torch.equal(g1, g2) and torch.equal(h1, h2)


def test_client_without_torch_imports_and_explains_the_extra() -> None:
    """With torch unimportable the client package imports; problems.exported raises an
    ImportError naming the extra to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from hessian_client import problems\n"
        "try:\n    problems.exported(None, None, {})\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install './client[torch]'" in out.stdout


def _paths(value: object) -> list[tuple]:
    """Paths to every JSON value inside `value` (for the fuzz below)."""
    out: list[tuple] = [()]
    if isinstance(value, dict):
        for k, v in value.items():
            out += [(k, *p) for p in _paths(v)]
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += [(i, *p) for p in _paths(v)]
    return out


def test_fuzzed_graph_json_is_refused_or_loaded_never_crashes() -> None:
    """300 random single-value corruptions of models/model.json (a value replaced by another
    JSON type): each archive loads or is refused with ValidationError/ResourceLimitError."""
    import io as _io
    import json
    import random
    import zipfile

    from hessian_service.engine.errors import ValidationError
    from hessian_service.engine.objectives.export_verify import load_program

    objective = random_problem("least_squares")
    x = random_params(objective)
    problem = problems.exported(exported_programs_twin(objective), x, dict(objective.data))
    with zipfile.ZipFile(_io.BytesIO(problem.exported.program)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in files if n.endswith("models/model.json"))
    doc = json.loads(files[name])
    rng = random.Random(0)
    paths = _paths(doc["graph_module"])[1:]
    junk = [None, 0, -1, 10**12, 1.5, "x", "torch.ops.aten.add.Tensor", [], {}, [1, 2], {"a": 1}]
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        mutated = json.loads(files[name])
        path = rng.choice(paths)
        target = mutated["graph_module"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = rng.choice(junk)
        out = _io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            for n, raw in files.items():
                z.writestr(n, json.dumps(mutated).encode() if n == name else raw)
        try:
            load_program(out.getvalue())
            outcomes["loaded"] += 1
        except (ValidationError, ResourceLimitError):
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0
