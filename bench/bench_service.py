"""The gRPC service: NewtonStep round trips against a bare gRPC echo, WatchRun streaming.

Both servers run as subprocesses on loopback, the client in this process. The echo
server answers a request of the NewtonStep request's size with bytes of the NewtonStep
response's size (no parsing, no work), so the ratio is what the service adds on top of
gRPC itself: protobuf decode/encode, validation, the engine's step, and the dispatch.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from concurrent import futures

import grpc

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import quick  # noqa: E402

TITLE = "Service: NewtonStep round trip and WatchRun streaming"
ECHO_METHOD = "/bench.Echo/Echo"
GD_ITERATIONS = quick(10_000, 500)
ROUNDS = quick(25, 3)
TARGET_RATIO = 1.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_echo(port: int, response_bytes: int) -> None:
    """A bare gRPC server whose one method returns `response_bytes` bytes for any request."""
    payload = b"\x01" * response_bytes
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: payload)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def _wait_ready(address: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with grpc.insecure_channel(address) as ch:
                grpc.channel_ready_future(ch).result(timeout=1)
                return
        except grpc.FutureTimeoutError:
            time.sleep(0.2)
    raise TimeoutError(address)


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


ENGINE_STEP = """
import statistics, sys, time
sys.path.insert(0, "bench")
from common import median_seconds
from hessian_service.engine import MethodOptions, take_step
from hessian_service.seed import seed_problem
objective, params = seed_problem()
options = MethodOptions(learning_rate=0.1, step_policy="fixed")  # the seed's full step
step = lambda: take_step(objective, params, options)
print(median_seconds(step, repeats={repeats}, min_time=0.15))
"""


def _engine_step_seconds() -> float:
    """The engine's NewtonStep for the seed problem alone, in a fresh process like the server."""
    out = subprocess.run(
        [sys.executable, "-c", ENGINE_STEP.format(repeats=quick(15, 3))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def run() -> str:
    """Measure and return the markdown section."""
    from common import format_seconds, interleaved_medians, markdown_table
    from hessian_client import Client, problems
    from hessian_client.proto import optimize_pb2, service_pb2
    from hessian_client.tensors import encode
    from hessian_service.engine import MethodOptions, make_objective

    data_dir = tempfile.mkdtemp(prefix="bench-service-")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    server = _spawn(["-m", "hessian_service.server", "--address", address, "--data-dir", data_dir])
    echo = None
    try:
        _wait_ready(address, server)
        client = Client(address, timeout=60)
        params, target = client.sample(0, [(5, 5), (5, 5)])
        problem = problems.mse(target)
        pid = client.create_problem(problem)
        inline_req = service_pb2.StepRequest(
            problem=problem,
            params=encode(params),
            options={"learning_rate": 0.1, "step_policy": optimize_pb2.STEP_POLICY_FIXED},
        )
        id_req = service_pb2.StepRequest(
            problem_id=pid,
            params=encode(params),
            options={"learning_rate": 0.1, "step_policy": optimize_pb2.STEP_POLICY_FIXED},
        )
        response = client.stub.NewtonStep(inline_req)
        info = client.info()
        echo_port = _free_port()
        echo_address = f"127.0.0.1:{echo_port}"
        echo = _spawn(
            [str(HERE / "bench_service.py"), "--echo", str(echo_port), str(response.ByteSize())]
        )
        _wait_ready(echo_address, echo)
        echo_channel = grpc.insecure_channel(echo_address)
        echo_call = echo_channel.unary_unary(ECHO_METHOD)
        inline_bytes = inline_req.SerializeToString()
        id_bytes = id_req.SerializeToString()

        def newton_inline() -> None:
            client.stub.NewtonStep(inline_req)

        def newton_by_id() -> None:
            client.stub.NewtonStep(id_req)

        def echo_inline() -> None:
            echo_call(inline_bytes)

        def echo_id() -> None:
            echo_call(id_bytes)

        def sdk_by_id() -> None:
            client.newton_step(pid, params, learning_rate=0.1, step_policy="fixed")

        calls = {
            "echo_inline": echo_inline,
            "newton_inline": newton_inline,
            "echo_id": echo_id,
            "newton_id": newton_by_id,
            "sdk_id": sdk_by_id,
        }
        t = interleaved_medians(calls, rounds=ROUNDS, min_time=quick(0.15, 0.02), warmup=20)
        t["engine"] = _engine_step_seconds()
        # Streaming: a GD_ITERATIONS gradient-descent run on Rosenbrock (n = 25), which
        # (unlike the float32 seed problem, which GD reaches exactly) never stops early.
        rosen = problems.rosenbrock(dim=25)
        rosen_objective = make_objective("rosenbrock", {}, {"dim": 25})
        rosen_x0 = rosen_objective.init_params()
        stopping = {
            "max_iterations": GD_ITERATIONS - 1,
            "gradient_tolerance": 0.0,
            "function_tolerance": 0.0,
            "parameter_tolerance": 0.0,
        }
        start = time.perf_counter()
        run_handle = client.start_run(
            rosen,
            rosen_x0.numpy(),
            method="gradient_descent",
            learning_rate=1e-4,
            stopping=stopping,
        )
        live = sum(1 for _ in run_handle.stream())
        live_s = time.perf_counter() - start
        assert live == GD_ITERATIONS, live
        replay_times = []
        for _ in range(3):
            start = time.perf_counter()
            replayed = sum(1 for _ in client.run(run_handle.id).stream())
            replay_times.append(time.perf_counter() - start)
            assert replayed == GD_ITERATIONS
        replay_s = sorted(replay_times)[1]
        from hessian_service.engine import Run, StopCriteria

        def engine_run(iterations: int) -> int:
            limits = StopCriteria(**{**stopping, "max_iterations": iterations - 1})
            gd = MethodOptions(method="gradient_descent", learning_rate=1e-4)
            return sum(1 for _ in Run(rosen_objective, rosen_x0, gd, limits))

        engine_run(50)  # warm-up: first-call costs are not the run's
        engine_start = time.perf_counter()
        n_engine = engine_run(GD_ITERATIONS)
        engine_run_s = time.perf_counter() - engine_start
        assert n_engine == GD_ITERATIONS
    finally:
        for proc in (server, echo):
            if proc is not None:
                proc.terminate()
                proc.wait(30)

    ratio_inline = t["newton_inline"] / t["echo_inline"]
    ratio_id = t["newton_id"] / t["echo_id"]
    rows = [
        [
            "NewtonStep, problem inline",
            f"{inline_req.ByteSize()} / {response.ByteSize()}",
            format_seconds(t["newton_inline"]),
            format_seconds(t["echo_inline"]),
            f"{ratio_inline:.2f}x",
        ],
        [
            "NewtonStep, problem by id",
            f"{id_req.ByteSize()} / {response.ByteSize()}",
            format_seconds(t["newton_id"]),
            format_seconds(t["echo_id"]),
            f"{ratio_id:.2f}x",
        ],
        [
            "client.newton_step (SDK, numpy in/out), by id",
            f"{id_req.ByteSize()} / {response.ByteSize()}",
            format_seconds(t["sdk_id"]),
            format_seconds(t["echo_id"]),
            f"{t['sdk_id'] / t['echo_id']:.2f}x",
        ],
        [
            "engine take_step alone (own process, no gRPC)",
            "-",
            format_seconds(t["engine"]),
            "-",
            "-",
        ],
    ]
    table1 = markdown_table(
        ["call (seed problem, n = 25)", "request / response bytes", "median", "echo", "ratio"],
        rows,
    )
    table2 = markdown_table(
        [f"{GD_ITERATIONS:,}-iteration GD run, Rosenbrock n = 25", "time", "records/s"],
        [
            [
                "StartRun + WatchRun while it runs (live)",
                format_seconds(live_s),
                f"{GD_ITERATIONS / live_s:,.0f}",
            ],
            [
                "WatchRun of the finished run (replay from the store)",
                format_seconds(replay_s),
                f"{GD_ITERATIONS / replay_s:,.0f}",
            ],
            [
                "engine Run alone (in process, no gRPC, no store)",
                format_seconds(engine_run_s),
                f"{GD_ITERATIONS / engine_run_s:,.0f}",
            ],
        ],
    )
    ratios = {
        "NewtonStep, problem inline": ratio_inline,
        "NewtonStep, problem by id": ratio_id,
        "client.newton_step (SDK), by id": t["sdk_id"] / t["echo_id"],
    }
    engine_share = t["engine"] / t["echo_id"]
    verdict_lines = [f"Target <= {TARGET_RATIO}x the echo round trip, each path on its own:"]
    for path, ratio in ratios.items():
        verdict_lines.append(
            f"- {path}: {ratio:.2f}x -> " + ("met" if ratio <= TARGET_RATIO else "**MISSED**")
        )
    if any(r > TARGET_RATIO for r in ratios.values()):
        verdict_lines.append(
            f"- The engine's step alone is {format_seconds(t['engine'])}, "
            f"{engine_share:.2f}x the echo round trip, against the {TARGET_RATIO - 1:.2f}x the "
            "target leaves for all work"
            + (
                ": the step alone exceeds it."
                if engine_share > TARGET_RATIO - 1
                else "; the rest of each miss is the Python servicer and client (protobuf "
                "objects, validation, tensor decode/encode)."
            )
        )
    verdict = "\n".join(verdict_lines)
    backend_note = (
        f"The server's NewtonStep ran on backend `{response.record.backend}`; native: "
        f"{info.native_reason}."
    )
    return (
        "Median round trip (loopback, one client, sequential calls) of NewtonStep for the "
        "seed problem against a bare gRPC echo server answering with the same byte counts, "
        f"both measured in this run, interleaved round by round ({ROUNDS} rounds, the order "
        "reversed every other round).\n\n"
        f"{table1}\n\n{backend_note}\n\n{verdict}\n\nStreaming throughput of WatchRun:\n\n"
        f"{table2}\n\n"
        "Live throughput is bounded by the run itself (each record is one engine iteration "
        "plus its store append); replay is the stream alone."
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--echo":
        serve_echo(int(sys.argv[2]), int(sys.argv[3]))
    else:
        print(run())
