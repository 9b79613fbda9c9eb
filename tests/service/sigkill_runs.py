"""The workload the SIGKILL tests share (one server killed, or the busiest of 3 replicas):
20 runs of 2 methods on 2 logistic-regression data sets, run to a fixed iteration count so
an interrupted run and an uninterrupted one must end on the same records, and the watcher
that collects what a client received before the kill."""

from __future__ import annotations

import threading

import grpc
import numpy as np
from hessian_client import Client, problems
from hessian_client.proto import service_pb2, service_pb2_grpc

RUNS = 20
EXACT = {"gradient_tolerance": 0.0, "function_tolerance": 0.0, "parameter_tolerance": 0.0}


def specs(newton_iterations: int, gd_iterations: int) -> dict[str, dict]:
    """The two run specs by name, stopped only by their iteration counts."""
    return {
        "newton": {"method": "newton", "damping": 1e-3, "learning_rate": 0.05,
                   "stopping": {"max_iterations": newton_iterations, **EXACT}},
        "gd": {"method": "gradient_descent", "learning_rate": 0.05,
               "stopping": {"max_iterations": gd_iterations, **EXACT}},
    }  # fmt: skip


def problem(seed: int):
    """A logistic regression on 200 points in 8 dimensions drawn from `seed`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 8))
    y = (x[:, 0] + 0.5 * rng.standard_normal(200) > 0).astype(np.float64)
    return problems.logistic_regression(x, y, l2=1e-3)


def kind(i: int) -> tuple[str, int]:
    """Run i's spec name and problem seed: 2 methods x 2 data sets, 5 runs each."""
    return ("newton", "gd")[i % 2], (i // 2) % 2


class Watcher(threading.Thread):
    """Collects (iteration, loss) of one run's WatchRun stream until it ends or breaks."""

    def __init__(self, address: str, run_id: str) -> None:
        super().__init__(daemon=True)
        self.address, self.run_id = address, run_id
        self.seen: list[tuple[int, float]] = []

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = service_pb2_grpc.HessianServiceStub(channel)
            try:
                for event in stub.WatchRun(service_pb2.WatchRunRequest(run_id=self.run_id)):
                    self.seen.extend((r.iteration, r.loss) for r in event.records)
            except grpc.RpcError:
                pass


def served_records(c: Client, run_id: str) -> list[tuple[int, float]]:
    """(iteration, loss) of every record the server serves for the run now."""
    return [(r.iteration, r.loss) for r in c.run(run_id).stream()]
