"""The seed notebook's GD-vs-Newton comparison run through a server (no torch on this side).

The notebook's torch.manual_seed(0); torch.rand(5, 5) (params); torch.rand(5, 5) (target)
draws come from the server's SampleTensors, so the losses equal the engine's exactly.
The table matches `python -m hessian_service.seed`.
"""

from __future__ import annotations

from .client import Client
from .problems import mse

SEED = 0
SHAPE = (5, 5)
EPOCHS = 40
LEARNING_RATE = 0.1
PRINTED_ITERATION = 30
NAMES = {"gd": "1st order (gradient descent)", "newton": "2nd order (Newton, lr = 0.1)"}
METHODS = {"gd": "gradient_descent", "newton": "newton"}


def seed_losses(client: Client, seed: int = SEED, epochs: int = EPOCHS) -> dict[str, list[float]]:
    """Per-iteration losses of gradient descent and fixed-step Newton (lr = 0.1), on the server."""
    params, target = client.sample(seed, [SHAPE, SHAPE], dtype="float32")
    problem_id = client.create_problem(mse(target))
    stopping = {
        "max_iterations": epochs - 1,
        "gradient_tolerance": 0.0,
        "function_tolerance": 0.0,
        "parameter_tolerance": 0.0,
    }
    losses = {}
    for key, method in METHODS.items():
        run = client.start_run(
            problem_id,
            params,
            method=method,
            step_policy="fixed",  # the notebook's x - lr H^-1 g, not the globalised default
            learning_rate=LEARNING_RATE,
            stopping=stopping,
            name=f"seed-{key}",
        )
        losses[key] = [record.loss for record in run.stream()]
    return losses


def improvement(first: float, last: float) -> float:
    """Relative improvement in percent, as the seed's table computes it."""
    return 100.0 * (first - last) / first


def format_table(losses: dict[str, list[float]]) -> str:
    """The seed's table, then the true final values, with the column's meaning spelled out."""
    last = len(losses["gd"]) - 1
    lines = [
        f"{'Method':<32} {'Initial (it 0)':>14} {'Seed final (it 30)':>19} {'Improvement':>12}",
    ]
    for key, name in NAMES.items():
        series = losses[key]
        at = series[PRINTED_ITERATION]
        lines.append(
            f"{name:<32} {series[0]:>14.4f} {at:>19.4f} {improvement(series[0], at):>11.1f}%"
        )
    lines.append("")
    lines.append(
        f"The seed's 'Final Loss (Epoch 40)' column holds iteration {PRINTED_ITERATION}, the last "
        f"one its loop printed (it printed every 10th). The true last iteration is {last}:"
    )
    for key, name in NAMES.items():
        series = losses[key]
        lines.append(
            f"{name:<32} {series[0]:>14.4f} {series[last]:>19.4g} "
            f"{improvement(series[0], series[last]):>11.1f}%"
        )
    return "\n".join(lines)
