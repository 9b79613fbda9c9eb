"""Reproduce the seed notebook's GD-vs-Newton comparison with the engine.

The notebook draws params then target with torch.rand(5, 5) after torch.manual_seed(0),
minimises nn.MSELoss(mean) for 40 iterations with lr = 0.1, and tabulates the losses.
Its "Final Loss (Epoch 40)" column is really the loss at iteration 30, the last one it
printed; this script prints both that and the true iteration-39 values.

    python -m hessian_service.seed [--json] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from hessian_client.seed import EPOCHS, LEARNING_RATE, SEED, SHAPE, format_table

from .engine import MethodOptions, Run, StopCriteria, make_objective
from .engine.objectives.base import Objective


def seed_problem(
    seed: int = SEED, shape: tuple[int, ...] = SHAPE
) -> tuple[Objective, torch.Tensor]:
    """The seed's objective and starting parameters, drawn exactly as the notebook draws them."""
    generator = torch.Generator().manual_seed(seed)
    params = torch.rand(shape, generator=generator)
    target = torch.rand(shape, generator=generator)
    return make_objective("mse", {"target": target}), params


def seed_losses(
    seed: int = SEED, epochs: int = EPOCHS, backend: str | None = None
) -> dict[str, list[float]]:
    """Per-iteration losses of gradient descent and fixed-step Newton (lr = 0.1), `epochs` each."""
    objective, params = seed_problem(seed)
    stopping = StopCriteria(
        max_iterations=epochs - 1,
        gradient_tolerance=0.0,
        function_tolerance=0.0,
        parameter_tolerance=0.0,
    )
    losses = {}
    for key, method in (("gd", "gradient_descent"), ("newton", "newton")):
        options = MethodOptions(
            method=method, step_policy="fixed", learning_rate=LEARNING_RATE, backend=backend
        )
        losses[key] = [r.loss for r in Run(objective, params, options, stopping)]
    return losses


def plot(losses: dict[str, list[float]], path: str) -> None:
    """Both loss curves on a log scale, as the seed's 'Graph Comparison'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.semilogy(losses["gd"], label="gradient descent (lr 0.1)")
    ax.semilogy(losses["newton"], label="Newton (lr 0.1)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("MSE loss")
    ax.set_title("Seed problem: gradient descent vs Newton's method")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the losses as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw both loss curves to FILE.png")
    parser.add_argument("--backend", choices=["auto", "native", "autograd"], default=None)
    args = parser.parse_args(argv)
    losses = seed_losses(backend=args.backend)
    if args.json:
        json.dump(losses, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(losses))
    if args.plot:
        plot(losses, args.plot)
        if not args.json:
            print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
