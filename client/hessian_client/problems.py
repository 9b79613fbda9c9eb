"""Builders for problems (catalogue, or your own exported program): each returns a `Problem`."""

from __future__ import annotations

import functools
import inspect
import io
import json
import keyword
import numbers
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .errors import invalid
from .options import WIRE_RANGES
from .proto import problem_pb2
from .tensors import dtype_of, encode

Problem = problem_pb2.Problem
M = TypeVar("M", bound=Message)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool(value)


_INTEGER = ("an integer", _is_integer)
# an objective option's wire type -> (what it takes, whether a value is one)
_TAKES: dict[int, tuple[str, Callable[[Any], bool]]] = {
    FieldDescriptor.TYPE_DOUBLE: ("a real number", _is_real),
    FieldDescriptor.TYPE_FLOAT: ("a real number", _is_real),
    FieldDescriptor.TYPE_INT32: _INTEGER,
    FieldDescriptor.TYPE_INT64: _INTEGER,
    FieldDescriptor.TYPE_UINT32: _INTEGER,
    FieldDescriptor.TYPE_UINT64: _INTEGER,
    FieldDescriptor.TYPE_BOOL: ("True or False", _is_bool),
    FieldDescriptor.TYPE_STRING: ("a string", lambda v: isinstance(v, str)),
    FieldDescriptor.TYPE_BYTES: ("bytes", lambda v: isinstance(v, bytes)),
}


def _objective(message: type[M], **options: Any) -> M:
    """`message` from keyword options (None: unset), each checked against its field's type
    first: a wrong one is InvalidArgument naming the keyword and what it takes."""
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in options.items():
        fd = fields[name]
        what, fits = _TAKES[fd.type]
        if value is None:  # unset: the server's default, as protobuf takes it
            continue
        if not fd.is_repeated:
            if not fits(value):
                raise invalid(name, what, value)
            if _TAKES[fd.type] is _INTEGER and value == 0 and not fd.has_presence:  # as unset
                raise invalid(
                    name, "an integer >= 1 (0 reads as unset: leave it out for the default)", 0
                )
        elif (
            isinstance(value, str | bytes)
            or not isinstance(value, Sequence | np.ndarray)
            or not all(fits(v) for v in value)
        ):
            raise invalid(name, f"a sequence, each {what}", value)
        _check_size(fd, name, value)
    return message(**options)


def _check_size(fd: FieldDescriptor, name: str, value: Any) -> None:
    """Refuse an integer field's value outside [1, the wire type's largest]: every integer
    of a catalogue problem is a size, and protobuf's own ValueError for `dim=2**70` named no
    field."""
    if fd.cpp_type not in WIRE_RANGES:
        return
    high = WIRE_RANGES[fd.cpp_type][1]
    if any(not 1 <= int(v) <= high for v in (value if fd.is_repeated else [value])):
        what = f"an integer in [1, {high}]"
        raise invalid(name, f"a sequence, each {what}" if fd.is_repeated else what, value)


def _arguments_named(builder: Callable[..., Problem]) -> Callable[..., Problem]:
    """`builder` refusing a keyword it does not take, or a missing argument, as
    InvalidArgument naming it (Python's TypeError said "unexpected keyword argument 'L2'",
    where the SDK's other refusals are HessianErrors)."""
    signature = inspect.signature(builder)
    names = list(signature.parameters)

    @functools.wraps(builder)
    def checked(*args: Any, **kwargs: Any) -> Problem:
        unknown = [k for k in kwargs if k not in signature.parameters]
        if unknown:
            raise invalid(unknown[0], f"one of the arguments {names}", unknown[0])
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError as exc:  # too many positional arguments, or one given twice
            raise invalid(builder.__name__, f"the arguments {names}", str(exc)) from None
        for name, parameter in signature.parameters.items():
            if parameter.default is parameter.empty and name not in bound.arguments:
                raise invalid(name, "a value (a required argument)", None)
        return builder(*args, **kwargs)

    return checked


def _data(real: Sequence[str] = (), **tensors: Any) -> dict[str, Any]:
    """The named data tensors, each encoded (an error names its field, data.NAME). Those
    named in `real`, real-valued for their objective, go as floats when given as integers or
    bools (the server takes float32/64 there: [[1, 2], [3, 4]] was refused as int64), of
    the dtype of the real fields given as floats (one float dtype per problem), else
    float64; the others (labels) go as int64 when given as bools."""
    for name, value in tensors.items():
        if value is None:  # a KeyError, or a problem the server then refused for its data
            raise invalid(name, "an array", None)
    kinds = {name: dtype_of(value) for name, value in tensors.items()}
    wire_floats = (np.dtype(np.float32), np.dtype(np.float64))
    floats = [kinds[n] for n in real if kinds.get(n) in wire_floats]
    real_dtype = floats[0] if floats else wire_floats[1]
    out = {}
    for name, value in tensors.items():
        kind = None if kinds[name] is None else kinds[name].kind
        if name in real and kind in ("i", "u", "b"):
            dtype = real_dtype
        elif kind == "b":
            dtype = np.dtype(np.int64)
        else:
            dtype = None
        out[name] = encode(value, dtype=dtype, field=f"data.{name}")
    return out


@_arguments_named
def mse(target: Any) -> Problem:
    """mean((params - target)^2); parameters are shaped like `target`."""
    return Problem(mse=problem_pb2.MseObjective(), data=_data(("target",), target=target))


@_arguments_named
def least_squares(X: Any, y: Any, *, l2: float = 0.0, fit_intercept: bool = False) -> Problem:
    """0.5 mean((X w + b - y)^2) + 0.5 l2 ||w||^2."""
    objective = _objective(problem_pb2.LeastSquaresObjective, l2=l2, fit_intercept=fit_intercept)
    return Problem(least_squares=objective, data=_data(("X", "y"), X=X, y=y))


@_arguments_named
def logistic_regression(X: Any, y: Any, *, l2: float = 0.0, fit_intercept: bool = True) -> Problem:
    """Mean logistic loss of X w + b against y in {0, 1}, plus 0.5 l2 ||w||^2."""
    objective = _objective(
        problem_pb2.LogisticRegressionObjective, l2=l2, fit_intercept=fit_intercept
    )
    return Problem(logistic_regression=objective, data=_data(("X",), X=X, y=y))


@_arguments_named
def softmax_regression(
    X: Any,
    labels: Any,
    *,
    num_classes: int | None = None,
    l2: float = 0.0,
    fit_intercept: bool = True,
) -> Problem:
    """Multinomial cross-entropy; labels are integers in [0, num_classes) (None: the
    server's max(labels) + 1)."""
    objective = _objective(
        problem_pb2.SoftmaxRegressionObjective,
        num_classes=num_classes,
        l2=l2,
        fit_intercept=fit_intercept,
    )
    return Problem(softmax_regression=objective, data=_data(("X",), X=X, labels=labels))


@_arguments_named
def mlp(
    X: Any,
    y: Any,
    *,
    layer_sizes: Sequence[int],
    activation: str = "",
    loss: str = "",
    l2: float = 0.0,
) -> Problem:
    """A fully connected network with an mse or cross_entropy loss."""
    objective = _objective(
        problem_pb2.MlpObjective, layer_sizes=layer_sizes, activation=activation, loss=loss, l2=l2
    )
    real = ("X",) if loss == "cross_entropy" else ("X", "y")  # its labels, or its targets
    return Problem(mlp=objective, data=_data(real, X=X, y=y))


@_arguments_named
def rosenbrock(dim: int = 2) -> Problem:
    """The Rosenbrock function in `dim` dimensions."""
    return Problem(rosenbrock=_objective(problem_pb2.RosenbrockObjective, dim=dim))


@_arguments_named
def quadratic(A: Any, b: Any) -> Problem:
    """0.5 x^T A x - b^T x with A symmetric."""
    return Problem(quadratic=problem_pb2.QuadraticObjective(), data=_data(("A", "b"), A=A, b=b))


TORCH_EXTRA = "pip install './client[torch]' (the torch extra of hessian-client)"


@_arguments_named
def exported(
    fn_or_module: Any,
    example_params: Any,
    data: dict[str, Any],
    *,
    loss: str = "",
    target: str = "y",
    rows: Sequence[str] = (),
) -> Problem:
    """Your own objective, sent as a torch.export program (needs the `torch` extra).

    `fn_or_module` is `fn(params, **inputs) -> loss` (scalar), or, with `loss` = mse /
    cross_entropy, `fn(params, **inputs) -> outputs` compared with `data[target]` (a
    Gauss-Newton form); an `nn.Module` is called as `module(*inputs)` (data order, target
    left out) with its parameters taken from the flat params (`parameters_to_vector` order;
    `example_params` None: its own values). Buffers (BatchNorm running stats, eval mode)
    travel as constants; a module that updates them (training mode) is refused.
    `data` holds every tensor (inputs, and the target when `loss` is set). `rows` names the
    inputs whose first dimension is the row count: exported with a symbolic row count, the
    program then takes mini-batches (curvature/gradient fractions) and Predict on new rows.
    """
    try:
        import torch
    except ImportError:
        raise ImportError(f"problems.exported needs torch: {TORCH_EXTRA}") from None
    if loss not in ("", "mse", "cross_entropy"):
        raise invalid("loss", "'' (fn returns the loss), mse or cross_entropy", loss)
    if not isinstance(data, Mapping):  # a list of tensors raised AttributeError ('items')
        raise invalid("data", "a mapping of input names to tensors", type(data).__name__)
    tensors = {k: torch.as_tensor(v) for k, v in data.items()}
    for k, v in tensors.items():  # the wire carries integers as int64: exported as they go
        if v.is_complex():  # a cast to int64 would drop the imaginary parts, and round
            raise invalid(f"data.{k}", "real values (float32, float64 or integers)", v.dtype)
        if v.dtype == torch.bool:  # traced as bool, it could not travel (refused after export)
            raise invalid(
                f"data.{k}",
                "float32, float64 or integers (the wire carries no bool: send the mask as "
                "0/1 integers and test it in the program, e.g. torch.where(m > 0, a, b))",
                "bool",
            )
        if not v.is_floating_point() and v.dtype != torch.int64:
            tensors[k] = v.to(torch.int64)
    if loss and target not in tensors:
        raise invalid(f"data.{target}", f"the target of the {loss} loss", sorted(tensors))
    inputs = {k: v for k, v in tensors.items() if not (loss and k == target)}
    for name in inputs:  # the program takes them as keyword arguments
        if not name.isidentifier() or keyword.iskeyword(name):
            raise invalid(f"data.{name}", "a Python identifier that is not a keyword", name)
        if name in ("params", "self"):  # the program's own arguments
            raise invalid(f"data.{name}", "a name other than params and self", name)
    function, inner = fn_or_module, None
    if isinstance(fn_or_module, torch.nn.Module):
        module = fn_or_module
        _refuse_training_mode(module, torch)
        if example_params is None:
            example_params = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
        function, inner = _functional(module)
    try:
        params = torch.as_tensor(example_params)
    except (TypeError, ValueError, RuntimeError):
        raise invalid(
            "example_params",
            "one tensor of every parameter (parameters_to_vector joins several)",
            type(example_params).__name__,
        ) from None
    if not params.is_floating_point():
        raise invalid("example_params", "float32 or float64 parameters", str(params.dtype))
    if inner is not None:
        count = sum(p.numel() for p in fn_or_module.parameters())
        if params.numel() != count:
            raise invalid("example_params", f"{count} values (the module's parameters)",
                          f"{params.numel()} values")  # fmt: skip
    for name in rows:
        if name not in inputs:
            raise invalid("rows", f"names of program inputs {sorted(inputs)}", name)
        if inputs[name].dim() == 0 or inputs[name].shape[0] < 2:
            # torch.export specialises a size of 0 or 1 and refuses to make it symbolic
            shape = list(inputs[name].shape)
            raise invalid(f"data.{name}", "at least 2 example rows to export a row count", shape)
    dynamic = None
    if rows:
        count = torch.export.Dim("rows")
        dynamic = {"params": None, **{k: ({0: count} if k in rows else None) for k in inputs}}
    module = _as_module(function, inner, list(inputs) if rows else None)
    program = torch.export.export(module, (params,), inputs, dynamic_shapes=dynamic)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    spec = _objective(
        problem_pb2.ExportedObjective,
        program=buffer.getvalue(),
        param_shape=list(params.shape),
        output_loss=loss,
        target=target if loss else "",
    )
    return Problem(exported=spec, data=_data(**tensors))


@_arguments_named
def exported_archive(
    program: bytes,
    data: dict[str, Any],
    *,
    param_shape: Sequence[int] | None = None,
    loss: str = "",
    target: str = "y",
) -> Problem:
    """A problem from the bytes of a `torch.export.save` archive (no torch needed here).

    `param_shape` defaults to the shape the archive declares for its first input (params).
    """
    if loss not in ("", "mse", "cross_entropy"):
        raise invalid("loss", "'' (the program returns the loss), mse or cross_entropy", loss)
    if param_shape is None:
        param_shape = _declared_params_shape(program)
    spec = _objective(
        problem_pb2.ExportedObjective,
        program=program,
        param_shape=param_shape,
        output_loss=loss,
        target=target if loss else "",
    )
    return Problem(exported=spec, data=_data(**data))


def _declared_params_shape(program: bytes) -> list[int]:
    """The static shape the archive's graph declares for its first user input."""
    try:
        with zipfile.ZipFile(io.BytesIO(program)) as archive:
            models = [n for n in archive.namelist() if n.endswith("models/model.json")]
            if len(models) != 1:
                raise ValueError(f"{len(models)} models/model.json members, not 1")
            (model,) = models
            graph = json.loads(archive.read(model))["graph_module"]
        first = graph["signature"]["input_specs"]
        name = next(s["user_input"]["arg"]["as_tensor"]["name"] for s in first if "user_input" in s)
        return [int(d["as_int"]) for d in graph["graph"]["tensor_values"][name]["sizes"]]
    except (zipfile.BadZipFile, ValueError, KeyError, TypeError, StopIteration) as exc:
        raise invalid(
            "program", "a torch.export.save archive with a static params input", str(exc)
        ) from None


def _as_module(function: Any, inner: Any = None, names: list[str] | None = None) -> Any:
    """An nn.Module whose forward is `function(params, **data)` (what torch.export takes);
    `inner`, a module `function` calls, is registered so export can trace it. `names`: the
    data names forward declares as arguments (torch.export's dynamic_shapes are keyed by
    them; it does not accept them for **data)."""
    import inspect

    import torch

    class Program(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, params: Any, **data: Any) -> Any:
            return function(params, **data)

    if names is not None:
        arg = inspect.Parameter.POSITIONAL_OR_KEYWORD
        Program.forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, arg) for n in ["self", "params", *names]]
        )
    return Program()


def _refuse_training_mode(module: Any, torch: Any) -> None:
    """Refuse a module whose training mode changes its calls: a BatchNorm or InstanceNorm that
    updates its running statistics, a dropout that draws random numbers. The server refused
    their programs naming only an ATen node ('add_', 'bernoulli'); `.eval()` is the cure."""
    for name, m in module.named_modules():
        if not m.training:
            continue
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
            does = "updates its running statistics"
        elif isinstance(m, torch.nn.modules.dropout._DropoutNd):
            does = "draws random numbers"
        else:
            continue
        raise invalid(
            "fn_or_module",
            "a module whose calls are functions of their inputs: call .eval() first (in "
            f"training mode {f'submodule {name!r}' if name else 'the module'} {does})",
            f"{type(m).__name__} in training mode",
        )


def _functional(module: Any) -> tuple[Any, Any]:
    """(`(flat params, **inputs) -> module(*inputs)`, the module it calls): a copy of `module`
    with its parameters removed, so the program takes them from params, never as weights."""
    import copy

    import torch

    shapes = [(name, p.shape) for name, p in module.named_parameters()]
    stripped = copy.deepcopy(module)
    for name, _ in shapes:
        owner, _, leaf = name.rpartition(".")
        sub = stripped.get_submodule(owner)
        del sub._parameters[leaf]
        setattr(sub, leaf, None)

    def call(params: Any, **inputs: Any) -> Any:
        values, offset = {}, 0
        for name, shape in shapes:
            n = shape.numel()
            values[name] = params[offset : offset + n].reshape(shape)
            offset += n
        return torch.func.functional_call(stripped, values, args=tuple(inputs.values()))

    return call, stripped
