"""The asyncio client: three runs at once, their records interleaving as they arrive."""

from __future__ import annotations

import asyncio

import numpy as np
from hessian_client import aio, problems

METHODS = ("gradient_descent", "newton", "newton_cg")


async def follow(client: aio.Client, problem_id: str, method: str) -> tuple[str, float, int]:
    """Start one run and stream it to the end: (method, final loss, records)."""
    options = {"learning_rate": 0.1} if method == "gradient_descent" else {}
    run = await client.start_run(
        problem_id, np.zeros(8), method=method, stopping={"max_iterations": 50}, **options
    )
    last = None
    async for record in run.stream():
        last = record
    return method, last.loss, last.iteration + 1


async def main() -> None:
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(200, 8)), rng.normal(size=200)
    async with aio.Client() as client:
        problem_id = await client.create_problem(problems.least_squares(X, y, l2=0.1))
        results = await asyncio.gather(*(follow(client, problem_id, m) for m in METHODS))
    for method, loss, records in results:
        print(f"{method:<17} final loss {loss:.10f} after {records} records")


if __name__ == "__main__":
    asyncio.run(main())
