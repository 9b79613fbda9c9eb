from . import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MseObjective(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeastSquaresObjective(_message.Message):
    __slots__ = ("l2", "fit_intercept")
    L2_FIELD_NUMBER: _ClassVar[int]
    FIT_INTERCEPT_FIELD_NUMBER: _ClassVar[int]
    l2: float
    fit_intercept: bool
    def __init__(self, l2: _Optional[float] = ..., fit_intercept: _Optional[bool] = ...) -> None: ...

class LogisticRegressionObjective(_message.Message):
    __slots__ = ("l2", "fit_intercept")
    L2_FIELD_NUMBER: _ClassVar[int]
    FIT_INTERCEPT_FIELD_NUMBER: _ClassVar[int]
    l2: float
    fit_intercept: bool
    def __init__(self, l2: _Optional[float] = ..., fit_intercept: _Optional[bool] = ...) -> None: ...

class SoftmaxRegressionObjective(_message.Message):
    __slots__ = ("num_classes", "l2", "fit_intercept")
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    FIT_INTERCEPT_FIELD_NUMBER: _ClassVar[int]
    num_classes: int
    l2: float
    fit_intercept: bool
    def __init__(self, num_classes: _Optional[int] = ..., l2: _Optional[float] = ..., fit_intercept: _Optional[bool] = ...) -> None: ...

class MlpObjective(_message.Message):
    __slots__ = ("layer_sizes", "activation", "loss", "l2")
    LAYER_SIZES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    layer_sizes: _containers.RepeatedScalarFieldContainer[int]
    activation: str
    loss: str
    l2: float
    def __init__(self, layer_sizes: _Optional[_Iterable[int]] = ..., activation: _Optional[str] = ..., loss: _Optional[str] = ..., l2: _Optional[float] = ...) -> None: ...

class RosenbrockObjective(_message.Message):
    __slots__ = ("dim",)
    DIM_FIELD_NUMBER: _ClassVar[int]
    dim: int
    def __init__(self, dim: _Optional[int] = ...) -> None: ...

class QuadraticObjective(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportedObjective(_message.Message):
    __slots__ = ("program", "param_shape", "output_loss", "target")
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    PARAM_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LOSS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    program: bytes
    param_shape: _containers.RepeatedScalarFieldContainer[int]
    output_loss: str
    target: str
    def __init__(self, program: _Optional[bytes] = ..., param_shape: _Optional[_Iterable[int]] = ..., output_loss: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class Problem(_message.Message):
    __slots__ = ("mse", "least_squares", "logistic_regression", "softmax_regression", "mlp", "rosenbrock", "quadratic", "exported", "data")
    class DataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    MSE_FIELD_NUMBER: _ClassVar[int]
    LEAST_SQUARES_FIELD_NUMBER: _ClassVar[int]
    LOGISTIC_REGRESSION_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_REGRESSION_FIELD_NUMBER: _ClassVar[int]
    MLP_FIELD_NUMBER: _ClassVar[int]
    ROSENBROCK_FIELD_NUMBER: _ClassVar[int]
    QUADRATIC_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    mse: MseObjective
    least_squares: LeastSquaresObjective
    logistic_regression: LogisticRegressionObjective
    softmax_regression: SoftmaxRegressionObjective
    mlp: MlpObjective
    rosenbrock: RosenbrockObjective
    quadratic: QuadraticObjective
    exported: ExportedObjective
    data: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, mse: _Optional[_Union[MseObjective, _Mapping]] = ..., least_squares: _Optional[_Union[LeastSquaresObjective, _Mapping]] = ..., logistic_regression: _Optional[_Union[LogisticRegressionObjective, _Mapping]] = ..., softmax_regression: _Optional[_Union[SoftmaxRegressionObjective, _Mapping]] = ..., mlp: _Optional[_Union[MlpObjective, _Mapping]] = ..., rosenbrock: _Optional[_Union[RosenbrockObjective, _Mapping]] = ..., quadratic: _Optional[_Union[QuadraticObjective, _Mapping]] = ..., exported: _Optional[_Union[ExportedObjective, _Mapping]] = ..., data: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...
