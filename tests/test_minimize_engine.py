"""The engine side of Optimize without grpc: a Run over asktell.RemoteObjective, its asks
answered from the catalogue Rosenbrock's own autograd values, yields records bit for bit
equal to a plain Run on that objective: the ask/tell path changes nothing in the method."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hessian_service.engine import MethodOptions, Run, StopCriteria
from hessian_service.engine.cancel import Cancelled, CancelToken
from hessian_service.engine.curvature.autograd import loss_and_grad, newton_system
from hessian_service.engine.curvature.products import ggn_product, hessian_product
from hessian_service.engine.errors import ValidationError
from hessian_service.engine.objectives import make_objective
from hessian_service.engine.solvers.asktell import (
    Answer,
    Ask,
    CallerLost,
    Capabilities,
    Exchange,
    RemoteObjective,
)
from problems import random_params, random_problem

FIELDS = ("iteration", "loss", "gradient_norm", "step_norm", "step_size", "damping",
          "gain_ratio", "cg_iterations", "step_accepted")  # fmt: skip


def answering(truth, exchange: Exchange, hvp_mode: str):
    """on_ask that answers at once from `truth` (the worker's own thread)."""

    def on_ask(ask: Ask) -> None:
        x = ask.point
        loss, grad = loss_and_grad(truth, x)
        answer = Answer(float(loss))
        if ask.gradient:
            answer.gradient = grad
        if ask.hessian:
            answer.hessian = newton_system(truth, x)[2]
        if ask.hvp_vectors is not None:
            product = hessian_product(truth, x, hvp_mode)
            answer.hvps = torch.stack([product(v) for v in ask.hvp_vectors])
        if ask.gn_vectors is not None:
            product = ggn_product(truth, x)
            answer.gn_products = torch.stack([product(v) for v in ask.gn_vectors])
        exchange.answer(ask.request_id, lambda _ask: answer)

    return on_ask


def fields(records) -> list[tuple]:
    out = []
    for r in records:
        values = tuple(getattr(r, f) for f in FIELDS)
        out.append(tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in values))
    return out


@pytest.mark.parametrize(
    ("options", "caps"),
    [
        (MethodOptions(method="newton"), Capabilities(gradient=True, hessian=True)),
        (
            MethodOptions(method="newton", step_policy="levenberg_marquardt"),
            Capabilities(gradient=True, hessian=True),
        ),
        (MethodOptions(method="saddle_free"), Capabilities(gradient=True, hessian=True)),
        (MethodOptions(method="newton_cg"), Capabilities(gradient=True, hvp=True)),
        (
            MethodOptions(method="gradient_descent", step_policy="line_search"),
            Capabilities(gradient=True),
        ),
    ],
)
def test_remote_run_records_equal_a_plain_runs(options, caps):
    options = dataclasses.replace(options, backend="autograd")
    truth = make_objective("rosenbrock", options={"dim": 6})
    x0 = torch.rand(6, dtype=torch.float64) * 1.6 + 0.2  # fresh each run
    stopping = StopCriteria(max_iterations=60)
    plain = Run(truth, x0, options, stopping).run_to_end()
    exchange = Exchange(CancelToken(), deadline_seconds=60.0)
    exchange.attach(answering(truth, exchange, options.hvp_mode))
    remote = Run(RemoteObjective(6, torch.float64, caps, exchange), x0, options, stopping)
    assert fields(remote.run_to_end()) == fields(plain)
    assert len(plain) > 3


def test_no_caller_is_caller_lost_and_cancel_wakes_a_waiting_ask():
    token = CancelToken()
    exchange = Exchange(token, deadline_seconds=60.0)
    with pytest.raises(CallerLost):
        exchange.ask({"point": torch.zeros(2)})
    exchange.attach(lambda ask: token.cancel())  # the caller never answers; CancelRun does
    with pytest.raises(Cancelled):
        exchange.ask({"point": torch.zeros(2)})


def test_a_silent_caller_is_caller_lost_after_the_deadline():
    exchange = Exchange(CancelToken(), deadline_seconds=0.2)
    exchange.attach(lambda ask: None)
    with pytest.raises(CallerLost, match="deadline"):
        exchange.ask({"point": torch.zeros(2)})


GN = Capabilities(gradient=True, gauss_newton=True)


@pytest.mark.parametrize("name", ["mlp", "logistic_regression"])
def test_remote_gauss_newton_cg_records_equal_a_plain_runs(name):
    """gauss_newton_cg over the caller's J^T J v products (answered from the objective's own
    GGN products) plugs into the engine's Gauss-Newton path unchanged: records bit for bit."""
    options = MethodOptions(method="gauss_newton_cg", backend="autograd")
    truth = random_problem(name)
    x0 = random_params(truth)
    stopping = StopCriteria(max_iterations=15)
    plain = Run(truth, x0, options, stopping).run_to_end()
    exchange = Exchange(CancelToken(), deadline_seconds=60.0)
    exchange.attach(answering(truth, exchange, options.hvp_mode))
    remote = RemoteObjective(truth.num_params, torch.float64, GN, exchange)
    assert fields(Run(remote, x0, options, stopping).run_to_end()) == fields(plain)
    assert len(plain) > 3


def test_remote_levenberg_marquardt_on_the_dense_ggn_reaches_the_plain_runs_minimum():
    """Dense curvature gauss_newton from n batched J^T J e_i products: LM reaches the same
    (unique: l2-regularised logistic regression is strictly convex) minimum as the engine's
    own GGN, assembled from the Jacobian, to 1e-10."""
    options = MethodOptions(
        method="newton", curvature="gauss_newton", step_policy="levenberg_marquardt",
        backend="autograd",
    )  # fmt: skip
    truth = random_problem("logistic_regression")
    x0 = random_params(truth)
    stopping = StopCriteria(max_iterations=200, gradient_tolerance=1e-9)
    plain = Run(truth, x0, options, stopping).run_to_end()
    exchange = Exchange(CancelToken(), deadline_seconds=60.0)
    exchange.attach(answering(truth, exchange, options.hvp_mode))
    remote = RemoteObjective(truth.num_params, torch.float64, GN, exchange)
    records = Run(remote, x0, options, stopping).run_to_end()
    assert records[-1].loss == pytest.approx(plain[-1].loss, abs=1e-10)
    assert records[-1].gradient_max_norm <= 1e-9


def test_gauss_newton_curvature_without_the_capability_names_it():
    exchange = Exchange(CancelToken(), deadline_seconds=60.0)
    remote = RemoteObjective(3, torch.float64, Capabilities(gradient=True, hvp=True), exchange)
    with pytest.raises(ValidationError, match=r"start\.capabilities\.gauss_newton"):
        Run(remote, torch.zeros(3, dtype=torch.float64), MethodOptions(method="gauss_newton_cg"))
