"""A float32 problem refuses, naming the field, an option float32 cannot hold (past its largest,
or a positive scale it rounds to 0) and a fixed step that overflows; before, they reached torch
as a bug (INTERNAL: "value cannot be converted to type float without overflow"), came back as
infinite parameters marked accepted, or as a step of exactly zero."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hessian_client import InvalidArgument, problems
from hessian_client.proto import optimize_pb2, service_pb2
from hessian_client.tensors import encode
from optimize_stream import Stream

HUGE = 1e39  # past float32's largest, 3.4e38; an ordinary float64


def _logistic32(rng):
    x = rng.standard_normal((40, 3)).astype(np.float32)
    y = (rng.random(40) < 0.5).astype(np.float32)
    return problems.logistic_regression(x, y)


STEPS = [
    ("gradient_step", {"learning_rate": HUGE}, "options.learning_rate"),
    ("newton_step", {"learning_rate": HUGE, "step_policy": "fixed"}, "options.learning_rate"),
    ("newton_step", {"learning_rate": HUGE}, "options.learning_rate"),
    ("newton_step", {"damping": HUGE}, "options.damping"),
    ("newton_step", {"method": "newton_cg", "trust_radius": HUGE}, "options.trust_radius"),
]


@pytest.mark.parametrize("rpc, options, field", STEPS)
def test_a_step_refuses_an_option_float32_cannot_hold(client, rng, rpc, options, field):
    with pytest.raises(InvalidArgument) as caught:
        getattr(client, rpc)(_logistic32(rng), np.zeros(4, np.float32), **options)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: expected a value float32 can hold")


def test_a_float64_problem_takes_the_same_option(client, rng):
    x = rng.standard_normal((40, 3))
    y = (rng.random(40) < 0.5).astype(float)
    step = client.newton_step(problems.logistic_regression(x, y), np.zeros(4), damping=HUGE)
    assert np.isfinite(step.params).all()


def test_a_run_and_an_optimize_refuse_it_before_anything_starts(client, rng):
    before = len(list(client.list_runs()))
    with pytest.raises(InvalidArgument, match=r"options\.learning_rate: expected a value float32"):
        client.start_run(_logistic32(rng), np.zeros(4, np.float32), method="gradient_descent",
                         learning_rate=HUGE)  # fmt: skip
    start = service_pb2.OptimizeStart(
        initial_params=encode(np.ones(3, np.float32)),
        capabilities=service_pb2.Capabilities(gradient=True, hessian=True),
        options=optimize_pb2.MethodOptions(method=optimize_pb2.METHOD_SADDLE_FREE,
                                           learning_rate=HUGE),
    )  # fmt: skip
    refused = Stream(client.address, service_pb2.OptimizeRequest(start=start)).refusal()
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().startswith("start.options.learning_rate: expected a value float32")
    assert len(list(client.list_runs())) == before


@pytest.mark.parametrize("rpc, options", [
    ("gradient_step", {"learning_rate": 3e38}),
    ("newton_step", {"learning_rate": 3e38, "step_policy": "fixed"}),
])  # fmt: skip
def test_a_fixed_step_that_overflows_is_refused_not_answered_as_infinite(client, rpc, options):
    rosenbrock = problems.rosenbrock(dim=4)
    start = np.array([-1.2, 1, -1.2, 1], np.float32)  # |g| ~ 1e3, the Newton step's |d| 1.6
    overflowed = r"options\.learning_rate: expected a step size whose new parameters are finite"
    with pytest.raises(InvalidArgument, match=overflowed):
        getattr(client, rpc)(rosenbrock, start, **options)
    # the same step from a point it does not overflow from (the minimum: d = 0) is answered
    step = getattr(client, rpc)(rosenbrock, np.ones(4, np.float32), **options)
    np.testing.assert_array_equal(step.params, np.ones(4, np.float32))


def test_an_integer_option_past_float32_is_refused_in_process_too():
    """In process an option may be a Python int (the wire's are doubles)."""
    import torch
    from hessian_service.engine import MethodOptions, ValidationError, make_objective, take_step

    objective = make_objective("rosenbrock", {}, {"dim": 3})
    x = torch.zeros(3, dtype=torch.float32)
    with pytest.raises(ValidationError, match=r"^options\.damping: expected a value float32"):
        take_step(objective, x, MethodOptions(damping=10**39))


TINY = 1e-46  # a positive float64 that float32 rounds to 0 (its smallest is 1.4e-45)


@pytest.mark.parametrize("rpc, options, field", [
    ("gradient_step", {"learning_rate": TINY}, "options.learning_rate"),
    ("newton_step", {"learning_rate": TINY, "step_policy": "fixed"}, "options.learning_rate"),
    ("newton_step", {"method": "saddle_free", "eigenvalue_floor": TINY},
     "options.eigenvalue_floor"),
    ("newton_step", {"method": "newton_cg", "trust_radius": 1e-300}, "options.trust_radius"),
])  # fmt: skip
def test_a_positive_scale_float32_rounds_to_zero_is_refused(client, rng, rpc, options, field):
    """Before, a learning rate of 1e-46 on a float32 problem became a step of exactly zero,
    answered as a step taken (and a run of them stalled), where float64 steps by it."""
    with pytest.raises(InvalidArgument) as caught:
        getattr(client, rpc)(_logistic32(rng), np.zeros(4, np.float32), **options)
    assert caught.value.field == field
    assert caught.value.message.startswith(
        f"{field}: expected a value float32 can hold (> 7.006e-46; float32 rounds it to 0)"
    )


def test_a_run_refuses_a_learning_rate_float32_rounds_to_zero_and_float64_takes_it(client, rng):
    before = len(list(client.list_runs()))
    with pytest.raises(InvalidArgument, match=r"options\.learning_rate: .*rounds it to 0"):
        client.start_run(_logistic32(rng), np.zeros(4, np.float32), method="gradient_descent",
                         learning_rate=TINY)  # fmt: skip
    assert len(list(client.list_runs())) == before
    x = rng.standard_normal((40, 3))
    y = (rng.random(40) < 0.5).astype(float)
    problem = problems.logistic_regression(x, y)
    step = client.gradient_step(problem, np.zeros(4), learning_rate=TINY)
    gradient = client.gradient_step(problem, np.zeros(4), learning_rate=1.0).params  # -g
    np.testing.assert_allclose(step.params, TINY * gradient, rtol=1e-12)
    assert np.all(step.params[gradient != 0] != 0)


def test_the_boundary_is_where_float32_rounds_to_zero():
    """2^-150, half float32's smallest subnormal, rounds (to even) to 0; the next double up
    rounds to 2^-149 and is a step."""
    import math

    import torch
    from hessian_service.engine import MethodOptions, ValidationError, make_objective, take_step

    objective = make_objective("rosenbrock", {}, {"dim": 2})
    x = torch.zeros(2, dtype=torch.float32)  # g = (-2, 0): a step of 2 lr shows there
    gd = {"method": "gradient_descent"}
    with pytest.raises(ValidationError, match=r"^options\.learning_rate: .*rounds it to 0"):
        take_step(objective, x, MethodOptions(learning_rate=2.0**-150, **gd))
    above = math.nextafter(2.0**-150, 1.0)
    step = take_step(objective, x, MethodOptions(learning_rate=above, **gd))
    assert step.params[0] != x[0]  # moved by one subnormal's worth of lr x g


@pytest.mark.parametrize("rpc", ["gradient_step", "newton_step", "compute_hessian", "start_run"])
def test_float64_params_past_float32_are_refused_as_such(client, rng, rpc):
    """1e150 sent to a float32 problem was cast to inf and refused as "a point where the loss
    and its derivatives are finite" (StartRun: a FAILED run); it is named as out of range."""
    field = "initial_params" if rpc == "start_run" else "params"
    with pytest.raises(InvalidArgument) as caught:
        getattr(client, rpc)(_logistic32(rng), np.full(4, 1e150))
    assert caught.value.message == (
        f"{field}: expected values this float32 problem holds (|x| <= 3.403e+38), "
        "got |x| up to 1e+150"
    )
