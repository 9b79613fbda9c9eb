from . import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_GRADIENT_DESCENT: _ClassVar[Method]
    METHOD_NEWTON: _ClassVar[Method]
    METHOD_SADDLE_FREE: _ClassVar[Method]
    METHOD_NEWTON_CG: _ClassVar[Method]
    METHOD_GAUSS_NEWTON_CG: _ClassVar[Method]
    METHOD_AUTO: _ClassVar[Method]

class StepPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_POLICY_UNSPECIFIED: _ClassVar[StepPolicy]
    STEP_POLICY_FIXED: _ClassVar[StepPolicy]
    STEP_POLICY_LINE_SEARCH: _ClassVar[StepPolicy]
    STEP_POLICY_LEVENBERG_MARQUARDT: _ClassVar[StepPolicy]
    STEP_POLICY_TRUST_REGION: _ClassVar[StepPolicy]

class CgForcing(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CG_FORCING_UNSPECIFIED: _ClassVar[CgForcing]
    CG_FORCING_EISENSTAT_WALKER: _ClassVar[CgForcing]
    CG_FORCING_FIXED: _ClassVar[CgForcing]

class HvpMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HVP_MODE_UNSPECIFIED: _ClassVar[HvpMode]
    HVP_MODE_FORWARD_OVER_REVERSE: _ClassVar[HvpMode]
    HVP_MODE_REVERSE_OVER_REVERSE: _ClassVar[HvpMode]

class Curvature(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CURVATURE_UNSPECIFIED: _ClassVar[Curvature]
    CURVATURE_HESSIAN: _ClassVar[Curvature]
    CURVATURE_GAUSS_NEWTON: _ClassVar[Curvature]

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_AUTO: _ClassVar[Backend]
    BACKEND_NATIVE: _ClassVar[Backend]
    BACKEND_AUTOGRAD: _ClassVar[Backend]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_GRADIENT_TOLERANCE: _ClassVar[StopReason]
    STOP_REASON_FUNCTION_TOLERANCE: _ClassVar[StopReason]
    STOP_REASON_PARAMETER_TOLERANCE: _ClassVar[StopReason]
    STOP_REASON_MAX_ITERATIONS: _ClassVar[StopReason]
    STOP_REASON_TIME_LIMIT: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]
    STOP_REASON_NON_FINITE: _ClassVar[StopReason]
    STOP_REASON_LINE_SEARCH_FAILED: _ClassVar[StopReason]
    STOP_REASON_SOLVER_FAILED: _ClassVar[StopReason]
    STOP_REASON_SHUTDOWN: _ClassVar[StopReason]
    STOP_REASON_ERROR: _ClassVar[StopReason]
    STOP_REASON_FUNCTION_STALLED: _ClassVar[StopReason]
    STOP_REASON_PARAMETERS_STALLED: _ClassVar[StopReason]
    STOP_REASON_NO_PROGRESS: _ClassVar[StopReason]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_MINIMUM: _ClassVar[Verdict]
    VERDICT_SADDLE: _ClassVar[Verdict]
    VERDICT_MAXIMUM: _ClassVar[Verdict]
    VERDICT_FLAT: _ClassVar[Verdict]

class Distribution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTRIBUTION_UNSPECIFIED: _ClassVar[Distribution]
    DISTRIBUTION_UNIFORM: _ClassVar[Distribution]
    DISTRIBUTION_NORMAL: _ClassVar[Distribution]
    DISTRIBUTION_OBJECTIVE_DEFAULT: _ClassVar[Distribution]
METHOD_UNSPECIFIED: Method
METHOD_GRADIENT_DESCENT: Method
METHOD_NEWTON: Method
METHOD_SADDLE_FREE: Method
METHOD_NEWTON_CG: Method
METHOD_GAUSS_NEWTON_CG: Method
METHOD_AUTO: Method
STEP_POLICY_UNSPECIFIED: StepPolicy
STEP_POLICY_FIXED: StepPolicy
STEP_POLICY_LINE_SEARCH: StepPolicy
STEP_POLICY_LEVENBERG_MARQUARDT: StepPolicy
STEP_POLICY_TRUST_REGION: StepPolicy
CG_FORCING_UNSPECIFIED: CgForcing
CG_FORCING_EISENSTAT_WALKER: CgForcing
CG_FORCING_FIXED: CgForcing
HVP_MODE_UNSPECIFIED: HvpMode
HVP_MODE_FORWARD_OVER_REVERSE: HvpMode
HVP_MODE_REVERSE_OVER_REVERSE: HvpMode
CURVATURE_UNSPECIFIED: Curvature
CURVATURE_HESSIAN: Curvature
CURVATURE_GAUSS_NEWTON: Curvature
BACKEND_UNSPECIFIED: Backend
BACKEND_AUTO: Backend
BACKEND_NATIVE: Backend
BACKEND_AUTOGRAD: Backend
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_GRADIENT_TOLERANCE: StopReason
STOP_REASON_FUNCTION_TOLERANCE: StopReason
STOP_REASON_PARAMETER_TOLERANCE: StopReason
STOP_REASON_MAX_ITERATIONS: StopReason
STOP_REASON_TIME_LIMIT: StopReason
STOP_REASON_CANCELLED: StopReason
STOP_REASON_NON_FINITE: StopReason
STOP_REASON_LINE_SEARCH_FAILED: StopReason
STOP_REASON_SOLVER_FAILED: StopReason
STOP_REASON_SHUTDOWN: StopReason
STOP_REASON_ERROR: StopReason
STOP_REASON_FUNCTION_STALLED: StopReason
STOP_REASON_PARAMETERS_STALLED: StopReason
STOP_REASON_NO_PROGRESS: StopReason
VERDICT_UNSPECIFIED: Verdict
VERDICT_MINIMUM: Verdict
VERDICT_SADDLE: Verdict
VERDICT_MAXIMUM: Verdict
VERDICT_FLAT: Verdict
DISTRIBUTION_UNSPECIFIED: Distribution
DISTRIBUTION_UNIFORM: Distribution
DISTRIBUTION_NORMAL: Distribution
DISTRIBUTION_OBJECTIVE_DEFAULT: Distribution

class MethodOptions(_message.Message):
    __slots__ = ("method", "step_policy", "learning_rate", "damping", "curvature", "backend", "eigenvalue_floor", "armijo", "backtrack", "max_backtracks", "dense_budget_bytes", "cg_max_iterations", "cg_tolerance", "cg_forcing", "trust_radius", "curvature_fraction", "seed", "hvp_mode", "gradient_fraction")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STEP_POLICY_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    EIGENVALUE_FLOOR_FIELD_NUMBER: _ClassVar[int]
    ARMIJO_FIELD_NUMBER: _ClassVar[int]
    BACKTRACK_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKTRACKS_FIELD_NUMBER: _ClassVar[int]
    DENSE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CG_MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    CG_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    CG_FORCING_FIELD_NUMBER: _ClassVar[int]
    TRUST_RADIUS_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HVP_MODE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    method: Method
    step_policy: StepPolicy
    learning_rate: float
    damping: float
    curvature: Curvature
    backend: Backend
    eigenvalue_floor: float
    armijo: float
    backtrack: float
    max_backtracks: int
    dense_budget_bytes: int
    cg_max_iterations: int
    cg_tolerance: float
    cg_forcing: CgForcing
    trust_radius: float
    curvature_fraction: float
    seed: int
    hvp_mode: HvpMode
    gradient_fraction: float
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., step_policy: _Optional[_Union[StepPolicy, str]] = ..., learning_rate: _Optional[float] = ..., damping: _Optional[float] = ..., curvature: _Optional[_Union[Curvature, str]] = ..., backend: _Optional[_Union[Backend, str]] = ..., eigenvalue_floor: _Optional[float] = ..., armijo: _Optional[float] = ..., backtrack: _Optional[float] = ..., max_backtracks: _Optional[int] = ..., dense_budget_bytes: _Optional[int] = ..., cg_max_iterations: _Optional[int] = ..., cg_tolerance: _Optional[float] = ..., cg_forcing: _Optional[_Union[CgForcing, str]] = ..., trust_radius: _Optional[float] = ..., curvature_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., hvp_mode: _Optional[_Union[HvpMode, str]] = ..., gradient_fraction: _Optional[float] = ...) -> None: ...

class StopCriteria(_message.Message):
    __slots__ = ("max_iterations", "gradient_tolerance", "function_tolerance", "parameter_tolerance", "time_limit_seconds")
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    max_iterations: int
    gradient_tolerance: float
    function_tolerance: float
    parameter_tolerance: float
    time_limit_seconds: float
    def __init__(self, max_iterations: _Optional[int] = ..., gradient_tolerance: _Optional[float] = ..., function_tolerance: _Optional[float] = ..., parameter_tolerance: _Optional[float] = ..., time_limit_seconds: _Optional[float] = ...) -> None: ...

class StepRecord(_message.Message):
    __slots__ = ("iteration", "loss", "loss_change", "gradient_norm", "gradient_max_norm", "step_norm", "step_size", "damping", "gain_ratio", "step_accepted", "negative_eigenvalues", "solver_attempts", "function_evaluations", "cg_iterations", "cg_residual", "negative_curvature", "backend", "iteration_seconds", "cumulative_seconds", "trust_radius", "gradient_batch_size", "step_damped", "end_point")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_CHANGE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_NORM_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    STEP_NORM_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    GAIN_RATIO_FIELD_NUMBER: _ClassVar[int]
    STEP_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_EIGENVALUES_FIELD_NUMBER: _ClassVar[int]
    SOLVER_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    CG_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    CG_RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CURVATURE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ITERATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRUST_RADIUS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_DAMPED_FIELD_NUMBER: _ClassVar[int]
    END_POINT_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    loss: float
    loss_change: float
    gradient_norm: float
    gradient_max_norm: float
    step_norm: float
    step_size: float
    damping: float
    gain_ratio: float
    step_accepted: bool
    negative_eigenvalues: int
    solver_attempts: int
    function_evaluations: int
    cg_iterations: int
    cg_residual: float
    negative_curvature: bool
    backend: str
    iteration_seconds: float
    cumulative_seconds: float
    trust_radius: float
    gradient_batch_size: int
    step_damped: bool
    end_point: Verdict
    def __init__(self, iteration: _Optional[int] = ..., loss: _Optional[float] = ..., loss_change: _Optional[float] = ..., gradient_norm: _Optional[float] = ..., gradient_max_norm: _Optional[float] = ..., step_norm: _Optional[float] = ..., step_size: _Optional[float] = ..., damping: _Optional[float] = ..., gain_ratio: _Optional[float] = ..., step_accepted: _Optional[bool] = ..., negative_eigenvalues: _Optional[int] = ..., solver_attempts: _Optional[int] = ..., function_evaluations: _Optional[int] = ..., cg_iterations: _Optional[int] = ..., cg_residual: _Optional[float] = ..., negative_curvature: _Optional[bool] = ..., backend: _Optional[str] = ..., iteration_seconds: _Optional[float] = ..., cumulative_seconds: _Optional[float] = ..., trust_radius: _Optional[float] = ..., gradient_batch_size: _Optional[int] = ..., step_damped: _Optional[bool] = ..., end_point: _Optional[_Union[Verdict, str]] = ...) -> None: ...

class CurvatureSummary(_message.Message):
    __slots__ = ("min_eigenvalue", "max_eigenvalue", "negative_eigenvalues", "condition_number", "positive_definite", "trace", "negative_tolerance")
    MIN_EIGENVALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_EIGENVALUE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_EIGENVALUES_FIELD_NUMBER: _ClassVar[int]
    CONDITION_NUMBER_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_DEFINITE_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    min_eigenvalue: float
    max_eigenvalue: float
    negative_eigenvalues: int
    condition_number: float
    positive_definite: bool
    trace: float
    negative_tolerance: float
    def __init__(self, min_eigenvalue: _Optional[float] = ..., max_eigenvalue: _Optional[float] = ..., negative_eigenvalues: _Optional[int] = ..., condition_number: _Optional[float] = ..., positive_definite: _Optional[bool] = ..., trace: _Optional[float] = ..., negative_tolerance: _Optional[float] = ...) -> None: ...

class SpectrumOptions(_message.Message):
    __slots__ = ("top_k", "bottom_k", "curvature", "max_lanczos_iterations", "eigen_tolerance", "trace_samples", "confidence", "density_probes", "density_steps", "density_sigma", "grid_points", "batch_size", "relative_tolerance", "absolute_tolerance", "gradient_tolerance", "seed", "hvp_mode", "block_size", "backend")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_K_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_LANCZOS_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    EIGEN_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    TRACE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DENSITY_PROBES_FIELD_NUMBER: _ClassVar[int]
    DENSITY_STEPS_FIELD_NUMBER: _ClassVar[int]
    DENSITY_SIGMA_FIELD_NUMBER: _ClassVar[int]
    GRID_POINTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    ABSOLUTE_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HVP_MODE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    bottom_k: int
    curvature: Curvature
    max_lanczos_iterations: int
    eigen_tolerance: float
    trace_samples: int
    confidence: float
    density_probes: int
    density_steps: int
    density_sigma: float
    grid_points: int
    batch_size: int
    relative_tolerance: float
    absolute_tolerance: float
    gradient_tolerance: float
    seed: int
    hvp_mode: HvpMode
    block_size: int
    backend: Backend
    def __init__(self, top_k: _Optional[int] = ..., bottom_k: _Optional[int] = ..., curvature: _Optional[_Union[Curvature, str]] = ..., max_lanczos_iterations: _Optional[int] = ..., eigen_tolerance: _Optional[float] = ..., trace_samples: _Optional[int] = ..., confidence: _Optional[float] = ..., density_probes: _Optional[int] = ..., density_steps: _Optional[int] = ..., density_sigma: _Optional[float] = ..., grid_points: _Optional[int] = ..., batch_size: _Optional[int] = ..., relative_tolerance: _Optional[float] = ..., absolute_tolerance: _Optional[float] = ..., gradient_tolerance: _Optional[float] = ..., seed: _Optional[int] = ..., hvp_mode: _Optional[_Union[HvpMode, str]] = ..., block_size: _Optional[int] = ..., backend: _Optional[_Union[Backend, str]] = ...) -> None: ...

class TraceEstimate(_message.Message):
    __slots__ = ("estimate", "half_width", "confidence", "products")
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    HALF_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    estimate: float
    half_width: float
    confidence: float
    products: int
    def __init__(self, estimate: _Optional[float] = ..., half_width: _Optional[float] = ..., confidence: _Optional[float] = ..., products: _Optional[int] = ...) -> None: ...

class SpectralDensity(_message.Message):
    __slots__ = ("grid", "density", "sigma", "probes", "steps", "trace")
    GRID_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    grid: _tensor_pb2.Tensor
    density: _tensor_pb2.Tensor
    sigma: float
    probes: int
    steps: int
    trace: float
    def __init__(self, grid: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., density: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sigma: _Optional[float] = ..., probes: _Optional[int] = ..., steps: _Optional[int] = ..., trace: _Optional[float] = ...) -> None: ...

class Initializer(_message.Message):
    __slots__ = ("seed", "distribution")
    SEED_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    seed: int
    distribution: Distribution
    def __init__(self, seed: _Optional[int] = ..., distribution: _Optional[_Union[Distribution, str]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("shape", "dtype", "distribution")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: _tensor_pb2.DType
    distribution: Distribution
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., distribution: _Optional[_Union[Distribution, str]] = ...) -> None: ...
