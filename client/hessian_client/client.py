"""The scripting API: `Client` for unary calls and `Run` for streamed, resumable runs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from . import tensors
from .curvature import CurvatureResult, from_wire, spectrum_options
from .errors import HessianError, from_rpc_error
from .options import enum_label, method_options, stop_criteria
from .proto import optimize_pb2, problem_pb2, service_pb2, service_pb2_grpc, tensor_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024**2
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
_DEFAULT = object()
STATUS_NAMES = {
    v: k.removeprefix("RUN_STATUS_") for k, v in service_pb2.RunStatus.items() if v != 0
}
FINAL_STATUSES = ("FINISHED", "CANCELLED", "FAILED", "INTERRUPTED")

StepRecord = optimize_pb2.StepRecord
RunInfo = service_pb2.RunInfo


def status_name(info: service_pb2.RunInfo) -> str:
    """The run's status as a plain name (QUEUED, RUNNING, FINISHED, ...)."""
    return STATUS_NAMES.get(info.status, "UNSPECIFIED")


@dataclass
class StepResult:
    """A unary step's new parameters (numpy, or torch when sent as torch) and its record.

    method is the method that ran (auto resolved); method_note says why auto chose it.
    """

    params: Any
    record: optimize_pb2.StepRecord
    method: str = ""
    method_note: str = ""


@dataclass
class HessianResult:
    """ComputeHessian's answer with the tensors decoded."""

    matrix: np.ndarray | None
    summary: optimize_pb2.CurvatureSummary
    loss: float
    gradient: np.ndarray
    backend: str


@dataclass
class RunResult:
    """A finished run: its final info, the final parameters and every record's loss."""

    info: service_pb2.RunInfo
    params: np.ndarray | None

    @property
    def status(self) -> str:
        return status_name(self.info)


class Client:
    """A connection to a hessian server. `timeout` is the default deadline of unary calls.

    `token` is sent as `authorization: Bearer <token>` on every call. `ca_file` (a PEM file)
    or `root_certificates` (PEM bytes) turn on TLS and name the CA that signed the server's
    certificate.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        timeout: float | None = 60.0,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        root_certificates: bytes | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.address = address or os.environ.get("HESSIAN_ADDRESS") or DEFAULT_ADDRESS
        if ca_file is not None:
            with open(ca_file, "rb") as fh:
                root_certificates = fh.read()
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(self.address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        self.stub = service_pb2_grpc.HessianServiceStub(self._channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, method: str, request: Any, timeout: Any = _DEFAULT) -> Any:
        """Invoke unary `method`, turning gRPC errors into typed HessianError subclasses."""
        deadline = self.timeout if timeout is _DEFAULT else timeout
        try:
            return getattr(self.stub, method)(request, timeout=deadline, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    @staticmethod
    def _source(problem: problem_pb2.Problem | str) -> dict[str, Any]:
        if isinstance(problem, str):
            return {"problem_id": problem}
        if isinstance(problem, problem_pb2.Problem):
            return {"problem": problem}
        raise TypeError("problem must be a Problem message or a problem id string")

    # unary calls
    def info(self) -> service_pb2.ServerInfo:
        """Version, backend and why, devices, limits."""
        return self.call("GetServerInfo", service_pb2.GetServerInfoRequest())

    def create_problem(self, problem: problem_pb2.Problem) -> str:
        """Upload a problem once; returns its content-addressed id."""
        return self.call(
            "CreateProblem", service_pb2.CreateProblemRequest(problem=problem)
        ).problem_id

    def sample(
        self,
        seed: int,
        shapes: Sequence[Sequence[int]],
        *,
        dtype: str = "float32",
        distribution: str = "uniform",
    ) -> list[np.ndarray]:
        """Draw tensors in order from the server's torch.Generator seeded with `seed`."""
        wire_dtype = {"float32": tensor_pb2.DTYPE_FLOAT32, "float64": tensor_pb2.DTYPE_FLOAT64}
        dist = optimize_pb2.Distribution.Value("DISTRIBUTION_" + distribution.upper())
        specs = [
            optimize_pb2.TensorSpec(shape=list(s), dtype=wire_dtype[dtype], distribution=dist)
            for s in shapes
        ]
        response = self.call(
            "SampleTensors", service_pb2.SampleTensorsRequest(seed=seed, tensors=specs)
        )
        return [tensors.decode(t) for t in response.tensors]

    def _step(self, rpc: str, problem: Any, params: Any, timeout: Any, options: dict) -> StepResult:
        request = service_pb2.StepRequest(
            params=tensors.encode(params),
            options=method_options(**options),
            **self._source(problem),
        )
        response = self.call(rpc, request, timeout)
        return StepResult(
            tensors.like_input(tensors.decode(response.params), params),
            response.record,
            enum_label("method", response.method),
            response.method_note,
        )

    def gradient_step(
        self,
        problem: problem_pb2.Problem | str,
        params: Any,
        *,
        learning_rate: float | None = None,
        step_policy: str | None = None,
        timeout: Any = _DEFAULT,
        **options: Any,
    ) -> StepResult:
        """One gradient-descent step from `params` (numpy array or torch tensor)."""
        options.update(learning_rate=learning_rate, step_policy=step_policy)
        return self._step("GradientStep", problem, params, timeout, options)

    def newton_step(
        self,
        problem: problem_pb2.Problem | str,
        params: Any,
        *,
        method: str | None = None,
        learning_rate: float | None = None,
        damping: float | None = None,
        step_policy: str | None = None,
        curvature: str | None = None,
        backend: str | None = None,
        timeout: Any = _DEFAULT,
        **options: Any,
    ) -> StepResult:
        """One Newton step from `params`.

        method: newton | saddle_free | newton_cg | gauss_newton_cg | auto (newton if the dense
        Hessian fits dense_budget_bytes, else newton_cg). Further keywords are method options
        (cg_max_iterations, cg_tolerance, cg_forcing, trust_radius, curvature_fraction,
        gradient_fraction, seed, hvp_mode, dense_budget_bytes, ...).
        """
        options.update(
            method=method,
            learning_rate=learning_rate,
            damping=damping,
            step_policy=step_policy,
            curvature=curvature,
            backend=backend,
        )
        return self._step("NewtonStep", problem, params, timeout, options)

    def compute_hessian(
        self,
        problem: problem_pb2.Problem | str,
        params: Any,
        *,
        curvature: str | None = None,
        backend: str | None = None,
        omit_matrix: bool = False,
        timeout: Any = _DEFAULT,
    ) -> HessianResult:
        """The dense curvature matrix at `params` and its spectrum summary."""
        opts = method_options(curvature=curvature, backend=backend)
        request = service_pb2.ComputeHessianRequest(
            params=tensors.encode(params),
            curvature=opts.curvature,
            backend=opts.backend,
            omit_matrix=omit_matrix,
            **self._source(problem),
        )
        r = self.call("ComputeHessian", request, timeout)
        matrix = tensors.decode(r.matrix) if r.HasField("matrix") else None
        return HessianResult(matrix, r.summary, r.loss, tensors.decode(r.gradient), r.backend)

    def analyze_curvature(
        self,
        problem: problem_pb2.Problem | str,
        params: Any,
        *,
        timeout: Any = _DEFAULT,
        **options: Any,
    ) -> CurvatureResult:
        """Matrix-free curvature at `params`: extreme eigenvalues, trace, density, verdict.

        Keywords are spectrum options (top_k, bottom_k, curvature, trace_samples, seed, ...).
        """
        request = service_pb2.AnalyzeCurvatureRequest(
            params=tensors.encode(params),
            options=spectrum_options(**options),
            **self._source(problem),
        )
        return from_wire(self.call("AnalyzeCurvature", request, timeout))

    # runs
    def start_run(
        self,
        problem: problem_pb2.Problem | str,
        params: Any = None,
        *,
        seed: int | None = None,
        init: str = "objective_default",
        name: str = "",
        stopping: dict[str, Any] | None = None,
        curvature_seed: int | None = None,
        **options: Any,
    ) -> Run:
        """Queue a run from `params` (or from a server-side draw with `seed`) -> Run.

        Keywords are method options (method="auto" picks newton or newton_cg by size; the
        returned run's `info().method_note` says which and why); curvature_seed is the
        Hessian-free sub-samples' seed (curvature rows and gradient mini-batches; method
        option `seed`).
        """
        request = service_pb2.StartRunRequest(
            options=method_options(seed=curvature_seed, **options),
            stopping=stop_criteria(**(stopping or {})),
            name=name,
            **self._source(problem),
        )
        if params is not None:
            request.initial_params.CopyFrom(tensors.encode(params))
        elif seed is not None:
            dist = optimize_pb2.Distribution.Value("DISTRIBUTION_" + init.upper())
            request.init.CopyFrom(optimize_pb2.Initializer(seed=seed, distribution=dist))
        info = self.call("StartRun", request)
        return Run(self, info.run_id, info)

    def run(self, run_id: str) -> Run:
        """A handle on an existing run."""
        return Run(self, run_id)

    def get_run(self, run_id: str, include_params: bool = False) -> service_pb2.RunInfo:
        """A run's status, stop reason, summary and (optionally) final parameters."""
        return self.call(
            "GetRun", service_pb2.GetRunRequest(run_id=run_id, include_params=include_params)
        )

    def list_runs(
        self, status: Sequence[str] = (), page_size: int = 50
    ) -> Iterator[service_pb2.RunInfo]:
        """Every run, newest first, filtered by status names; pages are fetched as needed."""
        values = [service_pb2.RunStatus.Value("RUN_STATUS_" + s.upper()) for s in status]
        token = ""
        while True:
            request = service_pb2.ListRunsRequest(
                page_size=page_size, page_token=token, status=values
            )
            response = self.call("ListRuns", request)
            yield from response.runs
            token = response.next_page_token
            if not token:
                return

    def cancel_run(self, run_id: str) -> service_pb2.RunInfo:
        """Stop a run before its next iteration (its records are kept)."""
        return self.call("CancelRun", service_pb2.RunRequest(run_id=run_id))

    def resume_run(self, run_id: str) -> Run:
        """Continue an INTERRUPTED run from its last checkpoint."""
        info = self.call("ResumeRun", service_pb2.RunRequest(run_id=run_id))
        return Run(self, run_id, info)

    def delete_run(self, run_id: str) -> bool:
        """Delete a run that is not executing."""
        return self.call("DeleteRun", service_pb2.RunRequest(run_id=run_id)).deleted


class Run:
    """A server-side run: stream its records (resuming after drops), wait, cancel, result."""

    def __init__(
        self, client: Client, run_id: str, info: service_pb2.RunInfo | None = None
    ) -> None:
        self.client = client
        self.id = run_id
        self.final: service_pb2.RunInfo | None = None
        self._info = info

    def __repr__(self) -> str:
        return f"Run({self.id!r})"

    def stream(
        self, from_iteration: int = 0, *, reconnect_timeout: float = 30.0
    ) -> Iterator[optimize_pb2.StepRecord]:
        """Every record from `from_iteration` on, exactly once, until the run ends.

        A dropped connection (UNAVAILABLE) is retried with backoff from the last iteration
        seen, for up to `reconnect_timeout` seconds without progress. `final` holds the
        run's state afterwards. A run that FAILED before its first record raises
        HessianError with the server's message (there is nothing to yield).
        """
        nxt = from_iteration
        last_progress = time.monotonic()
        delay = 0.05
        while True:
            request = service_pb2.WatchRunRequest(run_id=self.id, from_iteration=nxt)
            try:
                for event in self.client.stub.WatchRun(request, metadata=self.client.metadata):
                    for record in event.records:
                        if record.iteration < nxt:
                            continue
                        nxt = record.iteration + 1
                        last_progress = time.monotonic()
                        delay = 0.05
                        yield record
                    if event.HasField("final"):
                        self.final = event.final  # the last event: read on to the status
                if self.final is not None:
                    failed = STATUS_NAMES.get(self.final.status) == "FAILED"
                    if failed and self.final.num_records == 0:
                        raise HessianError(
                            f"run {self.id} failed before its first record: {self.final.message}"
                        )
                    return
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise from_rpc_error(exc) from None
                if time.monotonic() - last_progress > reconnect_timeout:
                    raise from_rpc_error(exc) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def wait(self, timeout: float | None = None) -> service_pb2.RunInfo:
        """Block until the run ends; return its final info (records are not kept)."""
        start = time.monotonic()
        for _ in self.stream(self._next_unseen()):
            if timeout is not None and time.monotonic() - start > timeout:
                raise HessianError(f"run {self.id} still running after {timeout} s")
        assert self.final is not None
        return self.final

    def _next_unseen(self) -> int:
        info = self.client.get_run(self.id)
        return max(int(info.num_records) - 1, 0)

    def cancel(self) -> service_pb2.RunInfo:
        """Ask the server to stop the run before its next iteration."""
        return self.client.cancel_run(self.id)

    def info(self) -> service_pb2.RunInfo:
        """The run's current state."""
        return self.client.get_run(self.id)

    def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the end, then return the final info and final parameters."""
        self.wait(timeout)
        info = self.client.get_run(self.id, include_params=True)
        params = tensors.decode(info.final_params) if info.HasField("final_params") else None
        return RunResult(info, params)
