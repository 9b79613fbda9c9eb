from . import optimize_pb2 as _optimize_pb2
from . import problem_pb2 as _problem_pb2
from . import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_QUEUED: _ClassVar[RunStatus]
    RUN_STATUS_RUNNING: _ClassVar[RunStatus]
    RUN_STATUS_FINISHED: _ClassVar[RunStatus]
    RUN_STATUS_CANCELLED: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]
    RUN_STATUS_INTERRUPTED: _ClassVar[RunStatus]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_QUEUED: RunStatus
RUN_STATUS_RUNNING: RunStatus
RUN_STATUS_FINISHED: RunStatus
RUN_STATUS_CANCELLED: RunStatus
RUN_STATUS_FAILED: RunStatus
RUN_STATUS_INTERRUPTED: RunStatus

class CreateProblemRequest(_message.Message):
    __slots__ = ("problem",)
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    problem: _problem_pb2.Problem
    def __init__(self, problem: _Optional[_Union[_problem_pb2.Problem, _Mapping]] = ...) -> None: ...

class CreateProblemResponse(_message.Message):
    __slots__ = ("problem_id", "num_params", "param_shape", "dtype")
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PARAM_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    problem_id: str
    num_params: int
    param_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: _tensor_pb2.DType
    def __init__(self, problem_id: _Optional[str] = ..., num_params: _Optional[int] = ..., param_shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class SampleTensorsRequest(_message.Message):
    __slots__ = ("seed", "tensors")
    SEED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    seed: int
    tensors: _containers.RepeatedCompositeFieldContainer[_optimize_pb2.TensorSpec]
    def __init__(self, seed: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_optimize_pb2.TensorSpec, _Mapping]]] = ...) -> None: ...

class SampleTensorsResponse(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("problem", "problem_id", "params", "options")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    problem: _problem_pb2.Problem
    problem_id: str
    params: _tensor_pb2.Tensor
    options: _optimize_pb2.MethodOptions
    def __init__(self, problem: _Optional[_Union[_problem_pb2.Problem, _Mapping]] = ..., problem_id: _Optional[str] = ..., params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., options: _Optional[_Union[_optimize_pb2.MethodOptions, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("params", "record", "method", "method_note")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_NOTE_FIELD_NUMBER: _ClassVar[int]
    params: _tensor_pb2.Tensor
    record: _optimize_pb2.StepRecord
    method: _optimize_pb2.Method
    method_note: str
    def __init__(self, params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., record: _Optional[_Union[_optimize_pb2.StepRecord, _Mapping]] = ..., method: _Optional[_Union[_optimize_pb2.Method, str]] = ..., method_note: _Optional[str] = ...) -> None: ...

class ComputeHessianRequest(_message.Message):
    __slots__ = ("problem", "problem_id", "params", "curvature", "backend", "omit_matrix", "dense_budget_bytes")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    OMIT_MATRIX_FIELD_NUMBER: _ClassVar[int]
    DENSE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    problem: _problem_pb2.Problem
    problem_id: str
    params: _tensor_pb2.Tensor
    curvature: _optimize_pb2.Curvature
    backend: _optimize_pb2.Backend
    omit_matrix: bool
    dense_budget_bytes: int
    def __init__(self, problem: _Optional[_Union[_problem_pb2.Problem, _Mapping]] = ..., problem_id: _Optional[str] = ..., params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., curvature: _Optional[_Union[_optimize_pb2.Curvature, str]] = ..., backend: _Optional[_Union[_optimize_pb2.Backend, str]] = ..., omit_matrix: _Optional[bool] = ..., dense_budget_bytes: _Optional[int] = ...) -> None: ...

class ComputeHessianResponse(_message.Message):
    __slots__ = ("matrix", "summary", "loss", "gradient", "backend")
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    matrix: _tensor_pb2.Tensor
    summary: _optimize_pb2.CurvatureSummary
    loss: float
    gradient: _tensor_pb2.Tensor
    backend: str
    def __init__(self, matrix: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., summary: _Optional[_Union[_optimize_pb2.CurvatureSummary, _Mapping]] = ..., loss: _Optional[float] = ..., gradient: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., backend: _Optional[str] = ...) -> None: ...

class AnalyzeCurvatureRequest(_message.Message):
    __slots__ = ("problem", "problem_id", "params", "options")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    problem: _problem_pb2.Problem
    problem_id: str
    params: _tensor_pb2.Tensor
    options: _optimize_pb2.SpectrumOptions
    def __init__(self, problem: _Optional[_Union[_problem_pb2.Problem, _Mapping]] = ..., problem_id: _Optional[str] = ..., params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., options: _Optional[_Union[_optimize_pb2.SpectrumOptions, _Mapping]] = ...) -> None: ...

class AnalyzeCurvatureResponse(_message.Message):
    __slots__ = ("num_params", "curvature", "loss", "gradient_max_norm", "stationary", "top_eigenvalues", "bottom_eigenvalues", "eigen_residuals", "lanczos_iterations", "eigenvalues_converged", "trace_hutchinson", "trace_hutchpp", "density", "products", "products_by_part", "verdict", "verdict_reason", "seconds", "backend")
    class ProductsByPartEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    STATIONARY_FIELD_NUMBER: _ClassVar[int]
    TOP_EIGENVALUES_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_EIGENVALUES_FIELD_NUMBER: _ClassVar[int]
    EIGEN_RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    LANCZOS_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    EIGENVALUES_CONVERGED_FIELD_NUMBER: _ClassVar[int]
    TRACE_HUTCHINSON_FIELD_NUMBER: _ClassVar[int]
    TRACE_HUTCHPP_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_BY_PART_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    VERDICT_REASON_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    num_params: int
    curvature: _optimize_pb2.Curvature
    loss: float
    gradient_max_norm: float
    stationary: bool
    top_eigenvalues: _containers.RepeatedScalarFieldContainer[float]
    bottom_eigenvalues: _containers.RepeatedScalarFieldContainer[float]
    eigen_residuals: _containers.RepeatedScalarFieldContainer[float]
    lanczos_iterations: int
    eigenvalues_converged: bool
    trace_hutchinson: _optimize_pb2.TraceEstimate
    trace_hutchpp: _optimize_pb2.TraceEstimate
    density: _optimize_pb2.SpectralDensity
    products: int
    products_by_part: _containers.ScalarMap[str, int]
    verdict: _optimize_pb2.Verdict
    verdict_reason: str
    seconds: float
    backend: str
    def __init__(self, num_params: _Optional[int] = ..., curvature: _Optional[_Union[_optimize_pb2.Curvature, str]] = ..., loss: _Optional[float] = ..., gradient_max_norm: _Optional[float] = ..., stationary: _Optional[bool] = ..., top_eigenvalues: _Optional[_Iterable[float]] = ..., bottom_eigenvalues: _Optional[_Iterable[float]] = ..., eigen_residuals: _Optional[_Iterable[float]] = ..., lanczos_iterations: _Optional[int] = ..., eigenvalues_converged: _Optional[bool] = ..., trace_hutchinson: _Optional[_Union[_optimize_pb2.TraceEstimate, _Mapping]] = ..., trace_hutchpp: _Optional[_Union[_optimize_pb2.TraceEstimate, _Mapping]] = ..., density: _Optional[_Union[_optimize_pb2.SpectralDensity, _Mapping]] = ..., products: _Optional[int] = ..., products_by_part: _Optional[_Mapping[str, int]] = ..., verdict: _Optional[_Union[_optimize_pb2.Verdict, str]] = ..., verdict_reason: _Optional[str] = ..., seconds: _Optional[float] = ..., backend: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("problem", "problem_id", "params", "inputs")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    problem: _problem_pb2.Problem
    problem_id: str
    params: _tensor_pb2.Tensor
    inputs: _tensor_pb2.Tensor
    def __init__(self, problem: _Optional[_Union[_problem_pb2.Problem, _Mapping]] = ..., problem_id: _Optional[str] = ..., params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., inputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _tensor_pb2.Tensor
    def __init__(self, outputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("problem", "problem_id", "options", "stopping", "initial_params", "init", "name")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    problem: _problem_pb2.Problem
    problem_id: str
    options: _optimize_pb2.MethodOptions
    stopping: _optimize_pb2.StopCriteria
    initial_params: _tensor_pb2.Tensor
    init: _optimize_pb2.Initializer
    name: str
    def __init__(self, problem: _Optional[_Union[_problem_pb2.Problem, _Mapping]] = ..., problem_id: _Optional[str] = ..., options: _Optional[_Union[_optimize_pb2.MethodOptions, _Mapping]] = ..., stopping: _Optional[_Union[_optimize_pb2.StopCriteria, _Mapping]] = ..., initial_params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., init: _Optional[_Union[_optimize_pb2.Initializer, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class StartRunResponse(_message.Message):
    __slots__ = ("run_id", "name", "status", "stop_reason", "converged", "message", "problem_id", "options", "stopping", "backend", "num_records", "last_record", "final_params", "created_at", "started_at", "finished_at", "method", "method_note", "params_iteration")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_RECORDS_FIELD_NUMBER: _ClassVar[int]
    LAST_RECORD_FIELD_NUMBER: _ClassVar[int]
    FINAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_NOTE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_ITERATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    status: RunStatus
    stop_reason: _optimize_pb2.StopReason
    converged: bool
    message: str
    problem_id: str
    options: _optimize_pb2.MethodOptions
    stopping: _optimize_pb2.StopCriteria
    backend: str
    num_records: int
    last_record: _optimize_pb2.StepRecord
    final_params: _tensor_pb2.Tensor
    created_at: float
    started_at: float
    finished_at: float
    method: _optimize_pb2.Method
    method_note: str
    params_iteration: int
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., stop_reason: _Optional[_Union[_optimize_pb2.StopReason, str]] = ..., converged: _Optional[bool] = ..., message: _Optional[str] = ..., problem_id: _Optional[str] = ..., options: _Optional[_Union[_optimize_pb2.MethodOptions, _Mapping]] = ..., stopping: _Optional[_Union[_optimize_pb2.StopCriteria, _Mapping]] = ..., backend: _Optional[str] = ..., num_records: _Optional[int] = ..., last_record: _Optional[_Union[_optimize_pb2.StepRecord, _Mapping]] = ..., final_params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., method: _Optional[_Union[_optimize_pb2.Method, str]] = ..., method_note: _Optional[str] = ..., params_iteration: _Optional[int] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("run_id", "name", "status", "stop_reason", "converged", "message", "problem_id", "options", "stopping", "backend", "num_records", "last_record", "final_params", "created_at", "started_at", "finished_at", "method", "method_note", "params_iteration")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_RECORDS_FIELD_NUMBER: _ClassVar[int]
    LAST_RECORD_FIELD_NUMBER: _ClassVar[int]
    FINAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_NOTE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_ITERATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    status: RunStatus
    stop_reason: _optimize_pb2.StopReason
    converged: bool
    message: str
    problem_id: str
    options: _optimize_pb2.MethodOptions
    stopping: _optimize_pb2.StopCriteria
    backend: str
    num_records: int
    last_record: _optimize_pb2.StepRecord
    final_params: _tensor_pb2.Tensor
    created_at: float
    started_at: float
    finished_at: float
    method: _optimize_pb2.Method
    method_note: str
    params_iteration: int
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., stop_reason: _Optional[_Union[_optimize_pb2.StopReason, str]] = ..., converged: _Optional[bool] = ..., message: _Optional[str] = ..., problem_id: _Optional[str] = ..., options: _Optional[_Union[_optimize_pb2.MethodOptions, _Mapping]] = ..., stopping: _Optional[_Union[_optimize_pb2.StopCriteria, _Mapping]] = ..., backend: _Optional[str] = ..., num_records: _Optional[int] = ..., last_record: _Optional[_Union[_optimize_pb2.StepRecord, _Mapping]] = ..., final_params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., method: _Optional[_Union[_optimize_pb2.Method, str]] = ..., method_note: _Optional[str] = ..., params_iteration: _Optional[int] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "from_iteration")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_ITERATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    from_iteration: int
    def __init__(self, run_id: _Optional[str] = ..., from_iteration: _Optional[int] = ...) -> None: ...

class WatchRunEvent(_message.Message):
    __slots__ = ("records", "final", "started")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_optimize_pb2.StepRecord]
    final: RunInfo
    started: StartRunResponse
    def __init__(self, records: _Optional[_Iterable[_Union[_optimize_pb2.StepRecord, _Mapping]]] = ..., final: _Optional[_Union[RunInfo, _Mapping]] = ..., started: _Optional[_Union[StartRunResponse, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id", "include_params")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    include_params: bool
    def __init__(self, run_id: _Optional[str] = ..., include_params: _Optional[bool] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run_id", "name", "status", "stop_reason", "converged", "message", "problem_id", "options", "stopping", "backend", "num_records", "last_record", "final_params", "created_at", "started_at", "finished_at", "method", "method_note", "params_iteration")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_RECORDS_FIELD_NUMBER: _ClassVar[int]
    LAST_RECORD_FIELD_NUMBER: _ClassVar[int]
    FINAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_NOTE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_ITERATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    status: RunStatus
    stop_reason: _optimize_pb2.StopReason
    converged: bool
    message: str
    problem_id: str
    options: _optimize_pb2.MethodOptions
    stopping: _optimize_pb2.StopCriteria
    backend: str
    num_records: int
    last_record: _optimize_pb2.StepRecord
    final_params: _tensor_pb2.Tensor
    created_at: float
    started_at: float
    finished_at: float
    method: _optimize_pb2.Method
    method_note: str
    params_iteration: int
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., stop_reason: _Optional[_Union[_optimize_pb2.StopReason, str]] = ..., converged: _Optional[bool] = ..., message: _Optional[str] = ..., problem_id: _Optional[str] = ..., options: _Optional[_Union[_optimize_pb2.MethodOptions, _Mapping]] = ..., stopping: _Optional[_Union[_optimize_pb2.StopCriteria, _Mapping]] = ..., backend: _Optional[str] = ..., num_records: _Optional[int] = ..., last_record: _Optional[_Union[_optimize_pb2.StepRecord, _Mapping]] = ..., final_params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., method: _Optional[_Union[_optimize_pb2.Method, str]] = ..., method_note: _Optional[str] = ..., params_iteration: _Optional[int] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class CancelRunResponse(_message.Message):
    __slots__ = ("run_id", "name", "status", "stop_reason", "converged", "message", "problem_id", "options", "stopping", "backend", "num_records", "last_record", "final_params", "created_at", "started_at", "finished_at", "method", "method_note", "params_iteration")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_RECORDS_FIELD_NUMBER: _ClassVar[int]
    LAST_RECORD_FIELD_NUMBER: _ClassVar[int]
    FINAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_NOTE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_ITERATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    status: RunStatus
    stop_reason: _optimize_pb2.StopReason
    converged: bool
    message: str
    problem_id: str
    options: _optimize_pb2.MethodOptions
    stopping: _optimize_pb2.StopCriteria
    backend: str
    num_records: int
    last_record: _optimize_pb2.StepRecord
    final_params: _tensor_pb2.Tensor
    created_at: float
    started_at: float
    finished_at: float
    method: _optimize_pb2.Method
    method_note: str
    params_iteration: int
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., stop_reason: _Optional[_Union[_optimize_pb2.StopReason, str]] = ..., converged: _Optional[bool] = ..., message: _Optional[str] = ..., problem_id: _Optional[str] = ..., options: _Optional[_Union[_optimize_pb2.MethodOptions, _Mapping]] = ..., stopping: _Optional[_Union[_optimize_pb2.StopCriteria, _Mapping]] = ..., backend: _Optional[str] = ..., num_records: _Optional[int] = ..., last_record: _Optional[_Union[_optimize_pb2.StepRecord, _Mapping]] = ..., final_params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., method: _Optional[_Union[_optimize_pb2.Method, str]] = ..., method_note: _Optional[str] = ..., params_iteration: _Optional[int] = ...) -> None: ...

class ResumeRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ResumeRunResponse(_message.Message):
    __slots__ = ("run_id", "name", "status", "stop_reason", "converged", "message", "problem_id", "options", "stopping", "backend", "num_records", "last_record", "final_params", "created_at", "started_at", "finished_at", "method", "method_note", "params_iteration")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_RECORDS_FIELD_NUMBER: _ClassVar[int]
    LAST_RECORD_FIELD_NUMBER: _ClassVar[int]
    FINAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_NOTE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_ITERATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    status: RunStatus
    stop_reason: _optimize_pb2.StopReason
    converged: bool
    message: str
    problem_id: str
    options: _optimize_pb2.MethodOptions
    stopping: _optimize_pb2.StopCriteria
    backend: str
    num_records: int
    last_record: _optimize_pb2.StepRecord
    final_params: _tensor_pb2.Tensor
    created_at: float
    started_at: float
    finished_at: float
    method: _optimize_pb2.Method
    method_note: str
    params_iteration: int
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., stop_reason: _Optional[_Union[_optimize_pb2.StopReason, str]] = ..., converged: _Optional[bool] = ..., message: _Optional[str] = ..., problem_id: _Optional[str] = ..., options: _Optional[_Union[_optimize_pb2.MethodOptions, _Mapping]] = ..., stopping: _Optional[_Union[_optimize_pb2.StopCriteria, _Mapping]] = ..., backend: _Optional[str] = ..., num_records: _Optional[int] = ..., last_record: _Optional[_Union[_optimize_pb2.StepRecord, _Mapping]] = ..., final_params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., method: _Optional[_Union[_optimize_pb2.Method, str]] = ..., method_note: _Optional[str] = ..., params_iteration: _Optional[int] = ...) -> None: ...

class DeleteRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "status")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    status: _containers.RepeatedScalarFieldContainer[RunStatus]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., status: _Optional[_Iterable[_Union[RunStatus, str]]] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunInfo]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[RunInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteRunResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class DeleteProblemRequest(_message.Message):
    __slots__ = ("problem_id",)
    PROBLEM_ID_FIELD_NUMBER: _ClassVar[int]
    problem_id: str
    def __init__(self, problem_id: _Optional[str] = ...) -> None: ...

class DeleteProblemResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_params", "dense_budget_bytes", "max_iterations", "max_concurrent_runs", "workers", "max_data_bytes", "max_runs_per_token", "max_stored_runs", "max_store_bytes", "max_spectrum_products", "max_list_page_size", "max_sample_elements", "max_problem_bytes", "problem_cache_bytes", "usable_cpus", "intra_op_threads", "single_thread_below")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PARAMS_FIELD_NUMBER: _ClassVar[int]
    DENSE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_RUNS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_STORED_RUNS_FIELD_NUMBER: _ClassVar[int]
    MAX_STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SPECTRUM_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LIST_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLE_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROBLEM_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USABLE_CPUS_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    SINGLE_THREAD_BELOW_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_params: int
    dense_budget_bytes: int
    max_iterations: int
    max_concurrent_runs: int
    workers: int
    max_data_bytes: int
    max_runs_per_token: int
    max_stored_runs: int
    max_store_bytes: int
    max_spectrum_products: int
    max_list_page_size: int
    max_sample_elements: int
    max_problem_bytes: int
    problem_cache_bytes: int
    usable_cpus: int
    intra_op_threads: int
    single_thread_below: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_params: _Optional[int] = ..., dense_budget_bytes: _Optional[int] = ..., max_iterations: _Optional[int] = ..., max_concurrent_runs: _Optional[int] = ..., workers: _Optional[int] = ..., max_data_bytes: _Optional[int] = ..., max_runs_per_token: _Optional[int] = ..., max_stored_runs: _Optional[int] = ..., max_store_bytes: _Optional[int] = ..., max_spectrum_products: _Optional[int] = ..., max_list_page_size: _Optional[int] = ..., max_sample_elements: _Optional[int] = ..., max_problem_bytes: _Optional[int] = ..., problem_cache_bytes: _Optional[int] = ..., usable_cpus: _Optional[int] = ..., intra_op_threads: _Optional[int] = ..., single_thread_below: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "default_backend", "native_available", "native_reason", "devices", "limits", "objectives", "methods", "torch_version", "api_version", "client_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BACKEND_FIELD_NUMBER: _ClassVar[int]
    NATIVE_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    NATIVE_REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    default_backend: str
    native_available: bool
    native_reason: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    objectives: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[str]
    torch_version: str
    api_version: str
    client_version: str
    def __init__(self, version: _Optional[str] = ..., default_backend: _Optional[str] = ..., native_available: _Optional[bool] = ..., native_reason: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., objectives: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[str]] = ..., torch_version: _Optional[str] = ..., api_version: _Optional[str] = ..., client_version: _Optional[str] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("gradient", "hessian", "hvp", "gauss_newton")
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_FIELD_NUMBER: _ClassVar[int]
    HVP_FIELD_NUMBER: _ClassVar[int]
    GAUSS_NEWTON_FIELD_NUMBER: _ClassVar[int]
    gradient: bool
    hessian: bool
    hvp: bool
    gauss_newton: bool
    def __init__(self, gradient: _Optional[bool] = ..., hessian: _Optional[bool] = ..., hvp: _Optional[bool] = ..., gauss_newton: _Optional[bool] = ...) -> None: ...

class OptimizeStart(_message.Message):
    __slots__ = ("initial_params", "options", "stopping", "capabilities", "name", "speculative")
    INITIAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    initial_params: _tensor_pb2.Tensor
    options: _optimize_pb2.MethodOptions
    stopping: _optimize_pb2.StopCriteria
    capabilities: Capabilities
    name: str
    speculative: bool
    def __init__(self, initial_params: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., options: _Optional[_Union[_optimize_pb2.MethodOptions, _Mapping]] = ..., stopping: _Optional[_Union[_optimize_pb2.StopCriteria, _Mapping]] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., name: _Optional[str] = ..., speculative: _Optional[bool] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("request_id", "loss", "gradient", "hessian", "hvps", "gn_products")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_FIELD_NUMBER: _ClassVar[int]
    HVPS_FIELD_NUMBER: _ClassVar[int]
    GN_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    loss: float
    gradient: _tensor_pb2.Tensor
    hessian: _tensor_pb2.Tensor
    hvps: _tensor_pb2.Tensor
    gn_products: _tensor_pb2.Tensor
    def __init__(self, request_id: _Optional[int] = ..., loss: _Optional[float] = ..., gradient: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., hessian: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., hvps: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., gn_products: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class OptimizeRequest(_message.Message):
    __slots__ = ("start", "resume_run_id", "evaluation", "stop", "resume_capabilities")
    START_FIELD_NUMBER: _ClassVar[int]
    RESUME_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    RESUME_CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    start: OptimizeStart
    resume_run_id: str
    evaluation: Evaluation
    stop: bool
    resume_capabilities: Capabilities
    def __init__(self, start: _Optional[_Union[OptimizeStart, _Mapping]] = ..., resume_run_id: _Optional[str] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., stop: _Optional[bool] = ..., resume_capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class EvaluationRequest(_message.Message):
    __slots__ = ("request_id", "point", "loss", "gradient", "hessian", "hvp_vectors", "gn_vectors")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_FIELD_NUMBER: _ClassVar[int]
    HVP_VECTORS_FIELD_NUMBER: _ClassVar[int]
    GN_VECTORS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    point: _tensor_pb2.Tensor
    loss: bool
    gradient: bool
    hessian: bool
    hvp_vectors: _tensor_pb2.Tensor
    gn_vectors: _tensor_pb2.Tensor
    def __init__(self, request_id: _Optional[int] = ..., point: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., loss: _Optional[bool] = ..., gradient: _Optional[bool] = ..., hessian: _Optional[bool] = ..., hvp_vectors: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., gn_vectors: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class OptimizeResponse(_message.Message):
    __slots__ = ("started", "evaluate", "finished", "records")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    started: RunInfo
    evaluate: EvaluationRequest
    finished: RunInfo
    records: _containers.RepeatedCompositeFieldContainer[_optimize_pb2.StepRecord]
    def __init__(self, started: _Optional[_Union[RunInfo, _Mapping]] = ..., evaluate: _Optional[_Union[EvaluationRequest, _Mapping]] = ..., finished: _Optional[_Union[RunInfo, _Mapping]] = ..., records: _Optional[_Iterable[_Union[_optimize_pb2.StepRecord, _Mapping]]] = ...) -> None: ...
