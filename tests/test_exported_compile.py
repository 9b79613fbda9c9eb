"""Compiled evaluation of exported programs (torch.compile of the verified graph).

Each compile takes seconds, so the objectives are built once per module: a scalar-loss mlp
and the same network in Gauss-Newton form, each compiled and interpreted.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hessian_client import problems
from hessian_service.engine import MethodOptions, Run, StopCriteria
from hessian_service.engine.cancel import Cancelled, CancelToken, scope
from hessian_service.engine.curvature.autograd import (
    gauss_newton,
    hessian,
    hvp,
    loss_and_grad,
    loss_value,
)
from hessian_service.engine.errors import ResourceLimitError, ValidationError
from hessian_service.engine.objectives import export_compile, make_objective
from hessian_service.engine.objectives.export_verify import Program
from hessian_service.server.codec import decode_tensor

F64 = torch.float64
REL = 1e-12  # compiled against interpreted, float64, relative to the reference's scale
SIZES = [5, 6, 3]
ROWS = 12


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    """|a - b| <= rel * max|b| elementwise."""
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) <= rel * scale


def outputs(params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A tanh mlp on flat params (the function exported; also the float64 reference)."""
    h, at = X, 0
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES)):
        w = params[at : at + fan_in * fan_out].reshape(fan_out, fan_in)
        at += fan_in * fan_out
        h = torch.nn.functional.linear(h, w, params[at : at + fan_out])
        at += fan_out
        h = torch.tanh(h) if i < len(SIZES) - 2 else h
    return h


def mse(params: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.mean((outputs(params, X) - y) ** 2)


N = sum(a * b + b for a, b in itertools.pairwise(SIZES))
GEN = torch.Generator().manual_seed(15)
DATA = {
    "X": torch.randn(ROWS, SIZES[0], generator=GEN, dtype=F64),
    "y": torch.randn(ROWS, SIZES[-1], generator=GEN, dtype=F64),
}


def build(fn, compile_: bool, **kw):
    """The engine objective of an SDK-exported `fn`, with or without compiled evaluation."""
    problem = problems.exported(fn, torch.zeros(N, dtype=F64), dict(DATA), **kw)
    spec = problem.exported
    data = {k: decode_tensor(v, k) for k, v in problem.data.items()}
    options = {
        "program": spec.program,
        "param_shape": list(spec.param_shape),
        "output_loss": spec.output_loss,
        "target": spec.target,
        "compile": compile_,
    }
    return make_objective("exported", data, options)


@pytest.fixture(scope="module")
def pair():
    """(compiled, interpreted) objectives of the scalar mse loss."""
    return build(mse, True), build(mse, False)


@pytest.fixture(scope="module")
def ggn_pair():
    """(compiled, interpreted) objectives of the outputs with output_loss mse."""
    return build(outputs, True, loss="mse"), build(outputs, False, loss="mse")


def fresh_point() -> torch.Tensor:
    return 0.5 * torch.randn(N, dtype=F64)


def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the interpreter unusable: what still evaluates went through the compiled code."""

    def refused(*args, **kwargs):
        raise AssertionError("the interpreter ran")

    monkeypatch.setattr(Program, "run", refused)


def test_compiled_loss_and_gradient_skip_the_interpreter_and_match_it(pair, monkeypatch):
    """Loss and gradient come from the compiled graph alone (the interpreter is disabled)
    and equal the interpreted ones and an independent torch.func float64 reference."""
    compiled, interpreted = pair
    points = [fresh_point() for _ in range(3)]
    expected = [loss_and_grad(interpreted, x) for x in points]
    no_interpreter(monkeypatch)
    for x, (ref_loss, ref_grad) in zip(points, expected, strict=True):
        loss, grad = loss_and_grad(compiled, x)
        assert close(loss, ref_loss) and close(grad, ref_grad)
        assert close(loss_value(compiled, x), ref_loss)
        func_grad, func_loss = torch.func.grad_and_value(mse)(x, DATA["X"], DATA["y"])
        assert close(loss, func_loss) and close(grad, func_grad)
    x = points[0].clone().requires_grad_(True)
    assert type(compiled.loss(x).grad_fn).__name__ == "CompiledLossBackward"


def test_second_derivatives_through_a_compiled_objective_match(pair):
    """Dense Hessian (create_graph through CompiledLoss) and HVPs (torch.func: interpreter)
    equal the interpreted objective's and torch.func's float64 Hessian."""
    compiled, interpreted = pair
    x, v = fresh_point(), torch.randn(N, dtype=F64)
    reference = torch.func.hessian(mse)(x, DATA["X"], DATA["y"])
    assert close(hessian(compiled, x), hessian(interpreted, x))
    assert close(hessian(compiled, x), reference)
    assert close(hvp(compiled, x, v), reference @ v, 1e-10)


def test_compiled_gauss_newton_form_matches_interpreted(ggn_pair, monkeypatch):
    """With output_loss mse the compiled loss, gradient and outputs equal the interpreter's;
    the Gauss-Newton matrix (Jacobians: interpreter) equals 2/(N m) J^T J of the plain fn."""
    compiled, interpreted = ggn_pair
    x = fresh_point()
    _, _, ggn = gauss_newton(compiled, x)
    jac = torch.func.jacrev(outputs)(x, DATA["X"]).reshape(-1, N)
    assert close(ggn, 2.0 / jac.shape[0] * jac.T @ jac)
    ref_loss, ref_grad = loss_and_grad(interpreted, x)
    ref_out = interpreted.predict(x)
    no_interpreter(monkeypatch)
    loss, grad = loss_and_grad(compiled, x)
    assert close(loss, ref_loss) and close(grad, ref_grad)
    assert close(compiled.predict(x), ref_out)


def test_predict_on_new_inputs_of_a_compiled_objective_uses_the_new_inputs(ggn_pair):
    """Predict on new rows (same shape as X) from a compiled objective: the outputs of the
    new rows (float64 reference), not of the rows compiled in."""
    compiled, _ = ggn_pair
    x, new_X = fresh_point(), torch.randn(ROWS, SIZES[0], dtype=F64)
    assert close(compiled.predict(x, new_X), outputs(x, new_X))
    assert close(compiled.predict(x), outputs(x, DATA["X"]))


def test_concurrent_compiled_evaluations_equal_solo_bit_for_bit(pair, ggn_pair):
    """8 threads share two compiled objectives (two programs in the process-global compile
    caches): losses and gradients at 16 points equal the same calls made alone, bit for bit
    (the compiled graphs hold no per-call state)."""
    objectives = [pair[0], ggn_pair[0]]
    jobs = [(objectives[i % 2], fresh_point()) for i in range(16)]

    def work(job) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        compiled, x = job
        loss, grad = loss_and_grad(compiled, x)
        return loss, grad, loss_value(compiled, x)

    solo = [work(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(work, jobs))
    for a, b in zip(solo, together, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_compiled_calls_while_another_program_compiles_stay_compiled(pair, monkeypatch, caplog):
    """Threads evaluating a compiled objective while this thread compiles another program:
    make_fx's process-wide tracing flag made their compiled calls raise, and the interpreter
    answered them (other bits than the same call alone). Every call stays compiled (the
    interpreter refuses the worker threads) and equals its solo result bit for bit."""
    compiled = pair[0]
    points = [fresh_point() for _ in range(4)]
    solo = [loss_and_grad(compiled, x) for x in points]
    interpret = Program.run
    main = threading.main_thread()

    def main_thread_only(*args, **kwargs):
        assert threading.current_thread() is main, "a worker's call ran the interpreter"
        return interpret(*args, **kwargs)

    monkeypatch.setattr(Program, "run", main_thread_only)
    compiling = threading.Event()
    calls = [0]

    def evaluate(i: int) -> None:
        while not compiling.is_set() or calls[0] < 40:
            loss, grad = loss_and_grad(compiled, points[i % len(points)])
            assert torch.equal(loss, solo[i % len(points)][0])
            assert torch.equal(grad, solo[i % len(points)][1])
            calls[0] += 1

    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(evaluate, i) for i in range(3)]
        other = build(lambda p, X, y: mse(p, X, y) + p.square().sum(), True)
        compiling.set()
        for w in workers:
            w.result()
    assert other.compiled is not None
    assert "compiled evaluation failed" not in caplog.text


def test_a_wait_for_another_compile_is_not_the_calls_time_and_may_be_cancelled(pair):
    """A compiled call queued behind another problem's compile (the lock held alone here for
    1.2 s) was charged that wait against its own limit (1 s): a ResourceLimitError blaming
    the program. It now answers, equal to the call alone; a call whose token is cancelled
    while it waits stops within the wait's 50 ms slices."""
    compiled = pair[0]
    x = fresh_point()
    alone = loss_and_grad(compiled, x)
    held, release = threading.Event(), threading.Event()

    def compile_elsewhere() -> None:
        with export_compile._COMPILE_LOCK.exclusive():
            held.set()
            release.wait(10)

    compiled.eval_seconds = 1.0
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(compile_elsewhere)
            assert held.wait(10)
            threading.Timer(1.2, release.set).start()
            waited = loss_and_grad(compiled, x)
        assert all(torch.equal(a, b) for a, b in zip(waited, alone, strict=True))
        with ThreadPoolExecutor(1) as pool:
            release.clear()
            held.clear()
            pool.submit(compile_elsewhere)
            assert held.wait(10)
            token = CancelToken()
            threading.Timer(0.2, token.cancel).start()
            started = time.monotonic()
            with scope(token), pytest.raises(Cancelled):
                loss_and_grad(compiled, x)
            assert time.monotonic() - started < 2.0  # not the 10 s the compile holds on
            release.set()
    finally:
        compiled.eval_seconds = 60.0
        release.set()


def test_compiled_call_keeps_the_limit_and_the_cancel_token(pair):
    """A compiled call is checked against the limit when it returns (a limit in the past: no
    timing dependence) and against the cancel token before it starts."""
    compiled, _ = pair
    x = fresh_point()
    compiled.eval_seconds = -1.0
    try:
        with pytest.raises(ResourceLimitError, match=r"limit of -1 s \(compiled\)"):
            loss_value(compiled, x)
        with pytest.raises(ResourceLimitError, match=r"limit of -1 s \(compiled\)"):
            loss_and_grad(compiled, x)
    finally:
        compiled.eval_seconds = 60.0
    token = CancelToken()
    token.cancel()
    with scope(token), pytest.raises(Cancelled):
        loss_value(compiled, x)


def test_a_compiled_program_that_raises_names_its_node_and_keeps_working():
    """Rows indexed by params: out of range at 50 (12 rows) the compiled call fails, the interpreter
    reruns it and names the node; a valid point afterwards still evaluates compiled."""
    X = DATA["X"]

    def indexed(params, X):
        return ((params - 10.0) ** 2).sum() + X.index_select(0, params[:1].long()).sum()

    problem = problems.exported(indexed, torch.zeros(3, dtype=F64), {"X": X})
    spec = problem.exported
    options = {"program": spec.program, "param_shape": [3], "compile": True}
    objective = make_objective("exported", {"X": X}, options)
    for evaluate in (loss_value, loss_and_grad):
        with pytest.raises(ValidationError, match=r"node 'index_select'.*IndexError"):
            evaluate(objective, torch.full((3,), 50.0, dtype=F64))
    x = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    ref = ((x - 10.0) ** 2).sum() + X[1].sum()
    assert close(loss_value(objective, x), ref)


def test_a_compiler_failure_falls_back_to_the_interpreter(monkeypatch, caplog):
    """Where torch.compile fails (here: made to raise), the problem is still built, logged,
    and evaluated by the interpreter: the server's flag never turns into a refusal."""

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(export_compile.torch, "compile", broken)
    objective = build(mse, True)
    assert objective.compiled is None
    assert "not compiled" in caplog.text and "no C++ compiler" in caplog.text
    x = fresh_point()
    loss, grad = loss_and_grad(objective, x)
    func_grad, func_loss = torch.func.grad_and_value(mse)(x, DATA["X"], DATA["y"])
    assert close(loss, func_loss) and close(grad, func_grad)


def test_a_program_too_long_to_compile_promptly_is_interpreted(monkeypatch):
    """A chain of 6,000 allowed multiplications compiled for 99 s holding the compile lock,
    every compiled call of every other problem waiting (after its sender gave up): programs
    over COMPILE_MAX_NODES are interpreted, with the same answers, and nothing compiles."""
    calls = []
    monkeypatch.setattr(export_compile.torch, "compile", lambda *a, **k: calls.append(a))
    length = export_compile.COMPILE_MAX_NODES + 1

    def chain(params: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = mse(params, X, y)
        for _ in range(length):
            value = value * 1.0000001
        return value

    objective = build(chain, True)
    assert objective.compiled is None and not calls
    x = fresh_point()
    loss, grad = loss_and_grad(objective, x)
    func_grad, func_loss = torch.func.grad_and_value(chain)(x, DATA["X"], DATA["y"])
    assert close(loss, func_loss) and close(grad, func_grad)


@pytest.mark.parametrize(
    ("method", "policy", "which"),
    [
        ("newton", "line_search", "pair"),
        ("newton_cg", "trust_region", "pair"),
        ("gauss_newton_cg", "trust_region", "ggn_pair"),
    ],
)
def test_runs_on_the_compiled_objective_repeat_the_interpreted_runs(method, policy, which, request):
    """Dense Newton, Newton-CG and Gauss-Newton-CG runs (products through CompiledLoss and
    the interpreter) give the interpreted objective's records."""
    compiled, interpreted = request.getfixturevalue(which)
    x = fresh_point()
    options = MethodOptions(method=method, step_policy=policy, backend="autograd")
    stop = StopCriteria(max_iterations=3)
    ours = Run(compiled, x, options, stop).run_to_end()
    ref = Run(interpreted, x, options, stop).run_to_end()
    assert [r.iteration for r in ours] == [r.iteration for r in ref]
    for a, b in zip(ours, ref, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-10, abs=1e-14)
        assert a.gradient_max_norm == pytest.approx(b.gradient_max_norm, rel=1e-8, abs=1e-12)
