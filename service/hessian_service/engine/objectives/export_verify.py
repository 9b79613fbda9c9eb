"""Read and verify a torch.export archive without running or unpickling anything it carries.

`torch.export.load` is not used on caller bytes: it reads the archive's example inputs with
`torch.load` (a pickle) and imports whatever the graph names. Instead the archive (a zip) is
read here: only `models/model.json` (the serialised graph, plain JSON) and the raw bytes of
lifted tensor constants (`use_pickle: false` only) are used. The pickled sample inputs are
never unpickled: their opcodes are scanned (pickletools, no execution) and an archive whose
pickle names anything but torch's tensor-rebuild functions is refused, as is any member this
reader does not know. Each graph node must call an allowlisted ATen
operator (functional, deterministic, no I/O); `Program.run` then interprets exactly those
nodes with ordinary torch ops, so autograd gives gradients and Hessian-vector products.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import re
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch._export.serde.schema import SCHEMA_VERSION
from torch.export.pt2_archive.constants import ARCHIVE_FORMAT_VALUE, ARCHIVE_VERSION_VALUE
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from .. import cancel
from ..errors import EvaluationError, ResourceLimitError, ValidationError

FIELD = "problem.exported.program"
MAX_PROGRAM_BYTES = 64 * 1024**2  # the archive as sent
MAX_MEMBER_BYTES = 64 * 1024**2  # one member, uncompressed (a zip bomb stops here)
MAX_NODES = 20_000
MAX_JSON_CONTAINERS = 1_000_000  # objects and lists in one JSON member (~50 per node)
# opcodes in a sample-inputs pickle (torch.save of tensors: tens per tensor; each is scanned)
MAX_PICKLE_OPCODES = 100_000
MAX_CONSTANT_ELEMENTS = 1_000_000
# all constants and buffers together (they are held as long as the problem is)
MAX_TOTAL_CONSTANT_ELEMENTS = 4 * MAX_CONSTANT_ELEMENTS
# one node's work, as torch's flop counter counts it (a conv2d within every element limit
# can take hours): a second or so of one core's GEMM, ten of a direct convolution's
MAX_NODE_FLOPS = 2 * 10**10
MAX_VALUE_ELEMENTS = 16 * 1024**2  # any tensor the graph computes (128 MiB in float64)
# all of them together: an evaluation keeps every value (the derivatives need them)
MAX_TOTAL_ELEMENTS = 4 * MAX_VALUE_ELEMENTS
BINDINGS_KEPT = 4  # programs bound to recent row counts, kept per program
# dimensions of any declared value: torch's vmap (the Hessian's batched products) takes 64
# (past it ComputeHessian answered INTERNAL), and repeat over 40,000 size-1 dimensions took
# 12 s of one node, time no element or flop limit sees
MAX_DIMENSIONS = 32

# Core ATen operators a loss needs, by packet name (any overload): pure functions of their
# inputs whose Hessian torch computes (batched double backward). No factories of
# caller-chosen size, no random, no I/O, no in-place, no custom ops, no higher-order ops;
# not group_norm (its batched double backward fails) nor hardsigmoid (no double backward);
# no pooling (no flop formula: a window of the input's size would cost n^2 uncounted).
ALLOWED_OPS = frozenset(
    """
    add sub rsub mul div neg pow abs sqrt rsqrt square reciprocal exp exp2 log log2 log10
    log1p expm1 logaddexp xlogy tanh sigmoid relu softplus gelu silu elu leaky_relu hardtanh
    sin cos tan atan asin acos sinh cosh erf sign floor ceil round
    matmul mm bmm addmm linear t transpose permute view reshape expand expand_as squeeze
    unsqueeze flatten unflatten contiguous clone alias detach detach_ lift_fresh_copy
    sum mean amax amin max min logsumexp prod norm linalg_vector_norm var std dot
    cat stack slice select index_select gather index narrow split chunk unbind diagonal
    tril triu where clamp clamp_min clamp_max maximum minimum eq ne lt le gt ge
    log_softmax softmax _log_softmax _softmax conv1d conv2d convolution
    batch_norm _native_batch_norm_legit_no_training
    nll_loss nll_loss_forward cross_entropy_loss mse_loss einsum embedding one_hot
    _to_copy to type_as zeros_like ones_like full_like scalar_tensor _assert_tensor_metadata
    numpy_T nll_loss_nd broadcast_tensors linalg_norm huber_loss smooth_l1_loss dropout
    layer_norm native_layer_norm instance_norm binary_cross_entropy
    binary_cross_entropy_with_logits kl_div l1_loss poisson_nll_loss soft_margin_loss
    cosine_similarity log_sigmoid log_sigmoid_forward selu celu mish hardswish logit atan2
    cumsum masked_fill mT flip repeat tile outer diag pad glu
    """.split()  # noqa: SIM905 (a word list reads better than 120 quoted strings)
)
# Losses whose CPU kernels broadcast these operands against their input out of place: each
# must broadcast to the input's own shape (_check_operands).
TO_INPUT_SHAPE = {
    "binary_cross_entropy_with_logits": ("target", "weight", "pos_weight"),
    "binary_cross_entropy": ("target", "weight"),
    "soft_margin_loss": ("target",),
}
# Normalisations whose batched double backward (the block products AnalyzeCurvature and the
# dense Gauss-Newton matrix take) fails when their tensors differ in dtype (a float16 input
# with float32 weights, which their CPU kernels take): one dtype, refused otherwise.
ONE_DTYPE = frozenset(
    ("layer_norm", "native_layer_norm", "instance_norm", "batch_norm",
     "_native_batch_norm_legit_no_training")
)  # fmt: skip
# Normalisations that update running statistics in place unless this flag is False.
RUNNING_STATS = {"batch_norm": "training", "instance_norm": "use_input_stats"}
# In-place forms that the exporter emits on fresh copies only: run as their functional form.
FUNCTIONAL_FORM = {"detach_": "detach"}

# The archive's ScalarType codes (torch/_export/serde/schema.py) of the dtypes accepted.
DTYPES = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}


def refuse(expected: str, got: object | None = None, field: str = FIELD) -> ValidationError:
    """The one error of an unacceptable program: INVALID_ARGUMENT naming what is wrong."""
    return ValidationError(field, expected, got)


@dataclass(frozen=True)
class Ref:
    """A reference to a named value of the graph (an input or an earlier node's output)."""

    name: str


@dataclass(frozen=True)
class Node:
    """One verified call: `op(*args, **kwargs)`, its results bound to `outputs`."""

    name: str
    target: str
    op: Any
    args: tuple
    kwargs: dict[str, Any]
    outputs: tuple  # names (str) or None, or ("*", [names]) for a list result


@dataclass(frozen=True)
class TensorMeta:
    """Declared dtype and shape of a graph value (static, or the row count's symbol)."""

    dtype: torch.dtype
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class RowCount:
    """The one symbolic size a program may declare: the data's row count, in [low, high]."""

    symbol: str
    low: int
    high: int


# A bare positive integer symbol, as torch.export writes a Dim (nothing else is evaluated).
ROW_SYMBOL = re.compile(r"Symbol\('([A-Za-z_]\w{0,31})', positive=True, integer=True\)")


class Program:
    """A verified graph: `run(params, data)` returns its one tensor output.

    Stateless after construction (nodes and constants are read-only; the cache of bindings
    to row counts is lock-guarded), so concurrent calls share a Program safely; each call
    keeps its values in a local environment.
    """

    def __init__(
        self,
        nodes: list[Node],
        params_name: str,
        data_names: dict[str, str],
        constants: dict[str, torch.Tensor],
        output: str,
        metas: dict[str, TensorMeta],
        row_count: RowCount | None = None,
        rows: int | None = None,
    ) -> None:
        self.nodes = nodes
        self.params_name = params_name
        self.data_names = data_names  # placeholder -> caller's data key
        self.constants = constants
        self.output = output
        self.metas = metas
        self.row_count = row_count  # None: every shape static
        self.rows = rows  # the row count the metas are bound to (None: unbound or static)
        self._bindings: OrderedDict[int | None, Program] = OrderedDict()
        self._lock = threading.Lock()

    def row_inputs(self) -> list[str]:
        """The data keys whose first dimension is the row count (none for static programs)."""
        if self.row_count is None:
            return []
        symbol = self.row_count.symbol
        return [k for p, k in self.data_names.items() if self.metas[p].shape[:1] == (symbol,)]

    def for_rows(self, rows: int | None) -> Program:
        """This program with its row count bound to `rows` (static programs: itself, checked):
        every declared size bounded, then the shapes checked on meta tensors. The last few
        bindings are kept (a mini-batch size recurs every step)."""
        with self._lock:
            bound = self._bindings.get(rows)
        if bound is None:
            bound = self._bind(rows)
            with self._lock:
                self._bindings[rows] = bound
                while len(self._bindings) > BINDINGS_KEPT:
                    self._bindings.popitem(last=False)
        return bound

    def _bind(self, rows: int | None) -> Program:
        metas = self.metas
        if self.row_count is not None:
            low, high, symbol = self.row_count.low, self.row_count.high, self.row_count.symbol
            if rows is None or not low <= rows <= high:
                raise refuse(f"a row count in [{low}, {high}] (as exported)", rows, "problem.data")
            metas = {
                name: TensorMeta(m.dtype, tuple(rows if s == symbol else s for s in m.shape))
                for name, m in metas.items()
            }
        total = 0
        for name, meta in metas.items():
            numel = math.prod(meta.shape)
            if numel > MAX_VALUE_ELEMENTS:
                raise ResourceLimitError(
                    FIELD,
                    f"value {name!r} declares {numel} elements, over the limit of "
                    f"{MAX_VALUE_ELEMENTS} per tensor",
                )
            total += numel
        if total > MAX_TOTAL_ELEMENTS:
            raise ResourceLimitError(
                FIELD,
                f"its values declare {total} elements together, over the limit of "
                f"{MAX_TOTAL_ELEMENTS} (an evaluation keeps every value for the derivatives)",
            )
        bound = Program(
            self.nodes,
            self.params_name,
            self.data_names,
            self.constants,
            self.output,
            metas,
            self.row_count,
            rows if self.row_count is not None else None,
        )
        bound.check_shapes()
        return bound

    def check_shapes(self) -> None:
        """Run every node on meta tensors (shapes only: no data, no allocation) and refuse a
        result that differs from its declared shape, so evaluation never computes anything
        larger than the graph declared (and bounded) before it ran."""
        env: dict[str, Any] = {k: v.to("meta") for k, v in self.constants.items()}
        for name in [self.params_name, *self.data_names]:
            meta = self.metas[name]
            env[name] = torch.empty(meta.shape, dtype=meta.dtype, device="meta")
        for node in self.nodes:
            args = [_bind(a, env) for a in node.args]
            kwargs = {k: _bind(v, env) for k, v in node.kwargs.items()}
            try:
                with _NodeCost() as cost:
                    result = node.op(*args, **kwargs)
            except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise refuse(
                    f"node {node.name!r} ({node.target}) to accept its inputs' declared "
                    "shapes and dtypes (static shapes, no data-dependent sizes)",
                    first,
                ) from None
            _check_cost(node, cost.flops, cost.largest)
            _check_operands(node, args, kwargs)
            for name in _store(node, result, env):
                _check_shape(node, name, env[name], self.metas[name], FIELD)

    def run(
        self, params: torch.Tensor, data: Mapping[str, torch.Tensor], seconds: float
    ) -> torch.Tensor:
        """Interpret the nodes on `params` and `data`; refuse past `seconds` of wall clock."""
        env: dict[str, Any] = dict(self.constants)
        env[self.params_name] = params
        for placeholder, key in self.data_names.items():
            env[placeholder] = data[key]
        deadline = time.monotonic() + seconds
        for node in self.nodes:
            cancel.check("evaluating an exported program")
            if time.monotonic() > deadline:
                raise ResourceLimitError(
                    "problem.exported",
                    f"an evaluation took over the server's limit of {seconds:g} s "
                    f"(stopped before node {node.name!r})",
                )
            args = [_bind(a, env) for a in node.args]
            kwargs = {k: _bind(v, env) for k, v in node.kwargs.items()}
            try:
                result = node.op(*args, **kwargs)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise EvaluationError(
                    "problem.exported",
                    f"a program that evaluates: node {node.name!r} ({node.target}) raised "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                ) from None
            for name in _store(node, result, env):
                _check_shape(node, name, env[name], self.metas[name])
        out = env[self.output]
        if not isinstance(out, torch.Tensor):
            raise refuse("a tensor output", type(out).__name__, "problem.exported")
        return out


# Factorisations torch's flop counter has no formula for (linalg_norm's ord 2 and "nuc" take
# an SVD): costed here at 10 m n min(m, n) per matrix of their first input
FACTORISATIONS = frozenset(
    getattr(torch.ops.aten, name)
    for name in ("_linalg_svd", "_linalg_eigh", "linalg_eig", "linalg_qr", "_linalg_det",
                 "_linalg_slogdet", "linalg_lu_factor_ex", "linalg_cholesky_ex", "_linalg_solve_ex")
    if hasattr(torch.ops.aten, name)
)  # fmt: skip


class _NodeCost(TorchDispatchMode):
    """A node's cost on meta tensors, as torch's flop counter counts it (its formulas, after
    decomposing what has none) plus FACTORISATIONS, and the most elements of any tensor the
    ATen calls under it make: a node's temporaries (an einsum's pairwise contractions) are
    not declared in the graph. Thread-local, as every dispatch mode (FlopCounterMode itself
    is not used: it installs global nn.Module hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry and packet not in FACTORISATIONS:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in flop_registry:
            self.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
        elif packet in FACTORISATIONS and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            *batch, m, n = args[0].shape
            self.flops += 10 * math.prod(batch) * m * n * min(m, n)
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def _check_operands(node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse an operand of TO_INPUT_SHAPE that does not broadcast to its node's input as it
    is: the meta kernel takes a (k, 1) pos_weight against a (k,) input, the CPU kernel
    builds the k x k product of the two before it fails (16 GiB from a 1 MB request). And
    refuse a ONE_DTYPE normalisation over tensors of several dtypes: it evaluated, then
    AnalyzeCurvature and Gauss-Newton curvature failed inside torch (INTERNAL)."""
    op = node.target.split(".")[3]
    if op in ONE_DTYPE:
        dtypes = {str(a.dtype).removeprefix("torch.") for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}  # fmt: skip
        if len(dtypes) > 1:
            raise refuse(
                f"node {node.name!r} ({node.target}): its input, weight and bias of one dtype "
                "(torch has no batched second derivative of a mixed-dtype normalisation: "
                "cast the weights to the input's dtype, or the input to theirs)",
                sorted(dtypes),
            )
    names = TO_INPUT_SHAPE.get(op)
    if not names:
        return
    schema = [a.name for a in node.op._schema.arguments]
    bound = dict(zip(schema, args, strict=False)) | kwargs
    shape = tuple(bound[schema[0]].shape)
    for name in names:
        value = bound.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        try:
            fits = torch.broadcast_shapes(value.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise refuse(
                f"node {node.name!r} ({node.target}): {name} of a shape that broadcasts to "
                f"its input's {list(shape)}",
                list(value.shape),
            )


def _check_cost(node: Node, flops: int, largest: int) -> None:
    """Refuse a node whose work (counted on meta tensors, as torch's flop counter does) or
    whose largest temporary is past the limits: the wall-clock limit and the call's
    deadline are checked between nodes, so one node must be bounded by itself."""
    where = f"node {node.name!r} ({node.target})"
    if flops > MAX_NODE_FLOPS:
        raise ResourceLimitError(
            FIELD,
            f"{where} takes {flops:.3g} floating-point operations, over the limit of "
            f"{MAX_NODE_FLOPS:.0e} per node",
        )
    if largest > MAX_VALUE_ELEMENTS:
        raise ResourceLimitError(
            FIELD,
            f"{where} makes a temporary of {largest} elements, over the limit of "
            f"{MAX_VALUE_ELEMENTS} per tensor",
        )


def _bind(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, list):
        return [_bind(v, env) for v in value]
    return value


def _store(node: Node, result: Any, env: dict[str, Any]) -> list[str]:
    """Bind a node's results in `env`; return the names bound."""
    if node.outputs and node.outputs[0] == "*":
        names = node.outputs[1]
        if not isinstance(result, (list, tuple)) or len(result) != len(names):
            raise refuse(f"node {node.name!r} ({node.target}) to return {len(names)} tensors")
        env.update(zip(names, result, strict=True))
        return list(names)
    if not node.outputs:  # a check such as _assert_tensor_metadata: nothing to bind
        return []
    if len(node.outputs) == 1:
        pairs = [(node.outputs[0], result)]
    elif not isinstance(result, (list, tuple)) or len(result) != len(node.outputs):
        raise refuse(f"node {node.name!r} ({node.target}) to return {len(node.outputs)} values")
    else:
        pairs = list(zip(node.outputs, result, strict=True))
    bound = [(name, value) for name, value in pairs if name is not None]
    env.update(bound)
    return [name for name, _ in bound]


def _check_shape(
    node: Node, name: str, value: Any, meta: TensorMeta, field: str = "problem.exported"
) -> None:
    """A result must be the tensor the graph declared: sizes are bounded before running."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != meta.shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise refuse(
            f"node {node.name!r} ({node.target}) to produce its declared shape {list(meta.shape)}",
            got,
            field,
        )


def _get(obj: Any, *path: Any) -> Any:
    """obj[path...] or a refusal naming the missing JSON key."""
    for key in path:
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            raise refuse(
                "a torch.export archive whose models/model.json has the 2.x schema",
                f"no {'.'.join(map(str, path))}",
            ) from None
    return obj


def _member(archive: zipfile.ZipFile, name: str) -> bytes:
    """One member's bytes, refusing a declared size over the limit before reading it, then
    inflating no more than that size: zipfile's read() of a whole member inflates up to
    2 GiB at a time before cutting to the declared size, which a crafted archive understates
    (the CRC check then refuses it)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise refuse("a torch.export.save archive", f"no member {name!r}") from None
    if info.file_size > MAX_MEMBER_BYTES:
        raise ResourceLimitError(
            FIELD, f"member {name!r} declares {info.file_size} bytes, over {MAX_MEMBER_BYTES}"
        )
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # zipfile inflates bzip2 and lzma members whole, whatever size they declare
        raise refuse(
            "members stored or deflated (as torch.export.save writes them)",
            f"{name!r} compressed with method {info.compress_type}",
        )
    try:
        with archive.open(info) as member:
            return member.read(info.file_size)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise refuse("a readable zip archive", f"{name!r}: {exc}") from None


def _json(archive: zipfile.ZipFile, name: str) -> Any:
    raw = _member(archive, name)
    # counted before parsing: a parsed empty object takes ~50 times its two bytes
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise ResourceLimitError(
            FIELD, f"{name!r} holds over {MAX_JSON_CONTAINERS} JSON objects and lists"
        )
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse("JSON", f"{name!r}: {exc}") from None


def _meta(raw: Any, what: str, symbolic: bool = False) -> TensorMeta:
    """A declared tensor: sizes are ints in [0, MAX_VALUE_ELEMENTS], or (`symbolic`) a bare
    symbol, a row count; the dtype one of DTYPES' codes (a bool is no code). These are what
    reaches torch constructors (meta tensors, constants' buffers); strides, storage offset
    and layout are not read."""
    code = _get(raw, "dtype")
    dtype = DTYPES.get(code) if type(code) is int else None
    if dtype is None:
        raise refuse(f"a known dtype code ({sorted(DTYPES)}) for {what}", code)
    sizes = _get(raw, "sizes")
    if not isinstance(sizes, list):
        raise refuse(f"a list of sizes for {what}", type(sizes).__name__)
    if len(sizes) > MAX_DIMENSIONS:
        raise refuse(f"at most {MAX_DIMENSIONS} dimensions for {what}", len(sizes))
    shape: list[int | str] = []
    for size in sizes:
        expr = size.get("as_expr") if symbolic and isinstance(size, dict) else None
        match = ROW_SYMBOL.fullmatch(str(expr.get("expr_str"))) if isinstance(expr, dict) else None
        if match:
            shape.append(match.group(1))
            continue
        value = size.get("as_int") if isinstance(size, dict) else None
        if type(value) is not int:
            raise refuse(f"static shapes (a row count at most) for {what}", size)
        if value < 0:
            raise refuse(f"sizes >= 0 for {what}", value)
        if value > MAX_VALUE_ELEMENTS:
            raise ResourceLimitError(
                FIELD,
                f"{what} declares a size of {value}, over the limit of {MAX_VALUE_ELEMENTS} "
                "elements per tensor",
            )
        shape.append(value)
    device = raw.get("device", {}).get("type", "cpu")
    if device != "cpu":
        raise refuse(f"a cpu tensor for {what}", device)
    return TensorMeta(dtype, tuple(shape))


def _float(value: Any) -> float:
    if isinstance(value, str) and value in ("Infinity", "-Infinity", "NaN"):
        return float(value.lower().replace("infinity", "inf"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise refuse("a number", value)
    return float(value)


def _argument(arg: Any, where: str) -> Any:
    """A serialised argument as a Python value (tensors as Refs); refuse other kinds."""
    if not isinstance(arg, dict) or len(arg) != 1:
        raise refuse(f"one argument kind in {where}", arg)
    ((kind, value),) = arg.items()
    if kind == "as_none":
        return None
    if kind == "as_tensor":
        return Ref(_get(value, "name"))
    if kind == "as_tensors":
        return [Ref(_get(v, "name")) for v in value]
    if kind == "as_optional_tensors":
        return [_argument(v, where) for v in value]
    if kind in ("as_int", "as_bool") and _int64(value):
        return value
    if kind in ("as_ints", "as_bools") and isinstance(value, list) and all(map(_int64, value)):
        return list(value)
    if kind == "as_float":
        return _float(value)
    if kind == "as_floats" and isinstance(value, list):
        return [_float(v) for v in value]
    if kind == "as_string" and isinstance(value, str):
        return value
    if kind == "as_scalar_type":
        dtype = DTYPES.get(value)
        if dtype is None:
            raise refuse(f"a known dtype in {where}", value)
        return dtype
    if kind == "as_layout" and value == 7:  # strided
        return torch.strided
    if kind == "as_device" and isinstance(value, dict) and value.get("type") == "cpu":
        return torch.device("cpu")
    if kind == "as_memory_format" and value == 1:  # contiguous_format
        return torch.contiguous_format
    raise refuse(f"static tensor/number arguments in {where}", kind)


def _int64(value: Any) -> bool:
    """An integer (or bool) an ATen op takes: in int64's range (past it, torch raised
    OverflowError deep inside the op)."""
    return isinstance(value, (int, bool)) and -(2**63) <= value < 2**63


def _node(raw: Any, index: int) -> Node:
    name = str(raw.get("name", f"#{index}")) if isinstance(raw, dict) else f"#{index}"
    target = _get(raw, "target")
    where = f"node {name!r} ({target})"
    parts = target.split(".") if isinstance(target, str) else []
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"]:
        raise refuse(f"allowlisted ATen operators only: {where} is not an ATen operator")
    packet = parts[3]
    if packet not in ALLOWED_OPS:
        raise refuse(f"allowlisted ATen operators only: {where} is not allowed")
    try:
        overloads = getattr(torch.ops.aten, FUNCTIONAL_FORM.get(packet, packet))
        # a name among the packet's overloads only: any other attribute (__setattr__) would
        # be called with the node's arguments
        op = getattr(overloads, parts[4]) if parts[4] in overloads.overloads() else None
    except (AttributeError, RuntimeError):
        op = None
    if op is None:
        raise refuse(f"an existing operator overload: {where} is unknown to this torch")
    if op._schema.is_mutable:  # an out= or in-place form writes into the data or params
        raise refuse(f"functional operator forms only: {where} writes into an argument")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in _get(raw, "inputs"):
        value = _argument(_get(item, "arg"), where)
        if item.get("kind", 1) == 2:
            kwargs[str(_get(item, "name"))] = value
        else:
            args.append(value)
    if packet == "dropout" and (len(args) < 3 or args[2] is not False):
        raise refuse(f"dropout in eval mode (train=False): {where} draws random numbers")
    # args[5]: batch_norm's training, instance_norm's use_input_stats; with running stats
    # (args[3:5]) given, either updates them in place
    if packet in RUNNING_STATS and (
        len(args) < 6 or (args[5] is not False and args[3:5] != [None, None])
    ):
        raise refuse(
            f"{packet} in eval mode ({RUNNING_STATS[packet]}=False, or no running stats): "
            f"{where} would update its running stats"
        )
    outputs: list[Any] = []
    raw_outputs = _get(raw, "outputs")
    if len(raw_outputs) == 1 and "as_tensors" in raw_outputs[0]:
        names = [_get(v, "name") for v in raw_outputs[0]["as_tensors"]]
        return Node(name, target, op, tuple(args), kwargs, ("*", names))
    for out in raw_outputs:
        if "as_tensor" in out:
            outputs.append(_get(out, "as_tensor", "name"))
        elif "as_none" in out:
            outputs.append(None)
        else:
            raise refuse(f"tensor results from {where}", list(out))
    return Node(name, target, op, tuple(args), kwargs, tuple(outputs))


def _uses(value: Any) -> list[str]:
    if isinstance(value, Ref):
        return [value.name]
    if isinstance(value, list):
        return [n for v in value for n in _uses(v)]
    return []


def _payload_configs(
    archive: zipfile.ZipFile, prefix: str, wanted: dict[str, dict[str, str]]
) -> dict[str, Any]:
    """Each folder's config ({name: entry}) of the constants (folder "constants") and module
    buffers (folder "weights") `wanted` names, parsed once (not once per constant)."""
    return {
        folder: _get(_json(archive, f"{prefix}data/{folder}/model_{folder}_config.json"), "config")
        for folder, names in wanted.items()
        if names
    }


def _constants(
    archive: zipfile.ZipFile,
    prefix: str,
    wanted: dict[str, dict[str, str]],
    configs: dict[str, Any],
) -> dict:
    """Lifted tensor constants and module buffers, by folder {placeholder: name} (their
    `configs`: _payload_configs), from raw bytes, all of them under one element budget; a
    pickled one, or a weight that is a parameter, is refused unread."""
    out: dict[str, torch.Tensor] = {}
    total = 0
    for folder, config in configs.items():
        for placeholder, cname in wanted[folder].items():
            entry = _get(config, cname)
            if entry.get("is_param", False) is not False:
                raise refuse("no parameters among the weights (they travel in params)", cname)
            if entry.get("use_pickle", True) is not False:
                raise refuse(
                    "tensor constants stored as raw bytes (no pickles)",
                    f"constant {cname!r} is pickled",
                )
            raw_meta = _get(entry, "tensor_meta")
            meta = _meta(raw_meta, f"constant {cname!r}")
            numel = math.prod(meta.shape)
            if numel > MAX_CONSTANT_ELEMENTS:
                raise ResourceLimitError(
                    FIELD, f"constant {cname!r} has {numel} values, over {MAX_CONSTANT_ELEMENTS}"
                )
            total += numel
            if total > MAX_TOTAL_CONSTANT_ELEMENTS:
                raise ResourceLimitError(
                    FIELD,
                    f"its constants and buffers hold over {MAX_TOTAL_CONSTANT_ELEMENTS} values "
                    f"together (at constant {cname!r})",
                )
            path = _get(entry, "path_name")
            if not isinstance(path, str) or "/" in path or path.startswith("."):
                raise refuse("a plain constant file name", path)
            raw = _member(archive, f"{prefix}data/{folder}/{path}")
            out[placeholder] = _strided(raw, meta, raw_meta, f"constant {cname!r}")
    return out


def _strided(raw: bytes, meta: TensorMeta, raw_meta: Any, what: str) -> torch.Tensor:
    """A constant from its storage's bytes (torch.export.save writes a view's whole storage)
    at its declared strides and storage offset, as a tensor of its own."""
    numel = math.prod(meta.shape)
    if numel == 0:
        return torch.empty(meta.shape, dtype=meta.dtype)
    strides = [_get(s, "as_int") for s in raw_meta.get("strides", [])] or None
    offset = _get(raw_meta.get("storage_offset", {"as_int": 0}), "as_int")
    if strides is None:  # an archive written without strides: contiguous
        strides = [math.prod(meta.shape[i + 1 :]) for i in range(len(meta.shape))]
    ints = all(type(v) is int and v >= 0 for v in [*strides, offset])
    if not ints or len(strides) != len(meta.shape):
        raise refuse(f"{len(meta.shape)} strides and a storage offset >= 0 for {what}",
                     {"strides": strides, "storage_offset": offset})  # fmt: skip
    itemsize = meta.dtype.itemsize
    needed = offset + 1 + sum((n - 1) * st for n, st in zip(meta.shape, strides, strict=True))
    if len(raw) % itemsize or len(raw) // itemsize < needed:
        raise refuse(
            f"at least {needed * itemsize} bytes (a multiple of {itemsize}) for {what}",
            f"{len(raw)} bytes",
        )
    storage = torch.frombuffer(bytearray(raw), dtype=meta.dtype)
    return storage.as_strided(meta.shape, strides, offset).clone(
        memory_format=torch.contiguous_format
    )


# Members of a torch.export.save archive besides the constants' raw files (under its prefix).
KNOWN_MEMBERS = frozenset(
    {
        "models/model.json",
        "data/weights/model_weights_config.json",
        "data/constants/model_constants_config.json",
        "data/sample_inputs/model.pt",
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
    }
)
# The globals a torch.save of plain tensors names (what weights_only loading would allow).
PICKLE_GLOBALS = frozenset(
    {"torch._utils _rebuild_tensor_v2", "collections OrderedDict"}
    | {f"torch {kind}Storage" for kind in ("Float", "Double", "Long", "Int", "Bool", "Half")}
    | {"torch BFloat16Storage", "torch ByteStorage", "torch CharStorage", "torch ShortStorage"}
)
PICKLE_OPCODES_REFUSED = frozenset({"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"})


def scan_pickle(raw: bytes, what: str) -> None:
    """Refuse a pickle (or a torch.save zip of one) naming anything but tensor rebuilds.

    Only reads opcodes (pickletools.genops): nothing is imported, called or constructed.
    """
    if raw[:4] == b"PK\x03\x04":
        try:
            inner = zipfile.ZipFile(io.BytesIO(raw))
            names = [n for n in inner.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise refuse(f"a torch.save archive in {what}", str(exc)) from None
        for name in names:
            scan_pickle(_member(inner, name), f"{what}/{name}")
        return
    for count, (name, arg) in enumerate(_opcodes(raw, what)):
        if count == MAX_PICKLE_OPCODES:
            raise ResourceLimitError(FIELD, f"{what}: over {MAX_PICKLE_OPCODES} pickle opcodes")
        if name in PICKLE_OPCODES_REFUSED or (name == "GLOBAL" and str(arg) not in PICKLE_GLOBALS):
            raise refuse(
                f"a pickle of plain tensors in {what} (it is never unpickled)",
                f"opcode {name} {arg if arg is not None else ''}".strip(),
            )


def _opcodes(raw: bytes, what: str) -> Iterator[tuple[str, Any]]:
    """The pickle's (opcode name, argument) pairs, one at a time; a malformed one refused."""
    ops = pickletools.genops(raw)
    while True:
        try:
            op, arg, _ = next(ops)
        except StopIteration:
            return
        except ValueError as exc:
            raise refuse(f"a well-formed pickle in {what}", str(exc)) from None
        yield op.name, arg


def _check_members(
    archive: zipfile.ZipFile, prefix: str, constant_files: set[str], buffer_files: set[str]
) -> None:
    """Refuse members this reader does not know, weights that are not the buffers the graph
    takes; scan the sample inputs' pickle."""
    for name in archive.namelist():
        inner = name.removeprefix(prefix) if name.startswith(prefix) else None
        if inner is None or (
            inner not in KNOWN_MEMBERS
            and inner.removeprefix("data/constants/") not in constant_files
            and inner.removeprefix("data/weights/") not in buffer_files
        ):
            raise refuse("only the members torch.export.save writes", f"member {name!r}")
    weights = f"{prefix}data/weights/model_weights_config.json"
    if weights in archive.namelist():
        entries = _get(_json(archive, weights), "config")
        for name, entry in entries.items():
            if not isinstance(entry, dict) or entry.get("path_name") not in buffer_files:
                raise refuse(
                    "no weights but the module buffers the graph takes (parameters travel in "
                    "params)",
                    f"weight {name!r}",
                )
    sample = f"{prefix}data/sample_inputs/model.pt"
    if sample in archive.namelist():
        scan_pickle(_member(archive, sample), sample)


def load_program(blob: bytes) -> tuple[Program, list[str]]:
    """Parse and verify archive bytes: (the Program, the data keys it takes in order).

    Any malformation the checks below do not name (a JSON value of the wrong type deep in
    the graph) is still a refusal, never an internal error.
    """
    try:
        return _load_program(blob)
    except (ValidationError, ResourceLimitError):
        raise
    except (AttributeError, TypeError, KeyError, IndexError, ValueError, RecursionError) as exc:
        raise refuse("a well-formed torch.export graph", f"{type(exc).__name__}: {exc}") from None


def _load_program(blob: bytes) -> tuple[Program, list[str]]:
    if len(blob) > MAX_PROGRAM_BYTES:
        raise ResourceLimitError(FIELD, f"{len(blob)} bytes, over {MAX_PROGRAM_BYTES}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise refuse("the bytes of torch.export.save (a zip archive)", str(exc)) from None
    models = [n for n in names if n.endswith("models/model.json")]
    if len(models) != 1:
        raise refuse("one models/model.json in the archive", f"{len(models)}")
    prefix = models[0].removesuffix("models/model.json")
    doc = _json(archive, models[0])
    _check_versions(archive, prefix, doc)
    module = _get(doc, "graph_module")
    graph = _get(module, "graph")
    raw_nodes = _get(graph, "nodes")
    if not isinstance(raw_nodes, list):
        raise refuse("a list of nodes at graph_module.graph.nodes", type(raw_nodes).__name__)
    if len(raw_nodes) > MAX_NODES:
        raise ResourceLimitError(
            FIELD, f"a graph of at most {MAX_NODES} nodes (it has {len(raw_nodes)})"
        )
    metas_raw = _get(graph, "tensor_values")
    signature = _get(module, "signature")
    user_inputs: list[str] = []
    constants: dict[str, str] = {}
    buffers: dict[str, str] = {}  # module buffers (e.g. BatchNorm running stats): constants
    for spec in _get(signature, "input_specs"):
        if not isinstance(spec, dict) or len(spec) != 1:
            raise refuse("input specs of one kind each", spec)
        ((kind, body),) = spec.items()
        if kind == "user_input":
            user_inputs.append(_get(body, "arg", "as_tensor", "name"))
        elif kind == "tensor_constant":
            constants[_get(body, "arg", "name")] = _get(body, "tensor_constant_name")
        elif kind == "buffer":  # torch.export.save keeps a non-persistent one with constants
            kept = buffers if _get(body, "persistent") is True else constants
            kept[_get(body, "arg", "name")] = _get(body, "buffer_name")
        else:
            raise refuse(
                "a functional program: tensor inputs (params, data), tensor constants and "
                "module buffers only (no parameters: pass them in params)",
                f"input of kind {kind}",
            )
    outputs = _get(signature, "output_specs")
    if len(outputs) != 1 or "user_output" not in outputs[0]:
        raise refuse("one user output (the loss or the model outputs) and no mutations", outputs)
    output = _get(outputs[0], "user_output", "arg", "as_tensor", "name")
    arg_names = _get(module, "module_call_graph", 0, "signature", "forward_arg_names")
    if not user_inputs or len(arg_names) != len(user_inputs):
        raise refuse("a program taking (params, **data) tensors", f"inputs {arg_names}")
    nodes = [_node(raw, i) for i, raw in enumerate(raw_nodes)]
    defined = set(user_inputs) | set(constants) | set(buffers)
    for node in nodes:
        for used in _uses(list(node.args)) + _uses(list(node.kwargs.values())):
            if used not in defined:
                raise refuse(f"node {node.name!r} ({node.target}) to use defined values", used)
        outs = node.outputs[1] if node.outputs and node.outputs[0] == "*" else node.outputs
        defined.update(n for n in outs if n is not None)
    if output not in defined:
        raise refuse("an output computed by the graph", output)
    metas = {name: _meta(raw, f"value {name!r}", True) for name, raw in metas_raw.items()}
    for name in sorted(defined - set(constants) - set(buffers)):
        if name not in metas:
            raise refuse(f"a declared shape for every value, also {name!r}")
    row_count = _row_count(doc, metas, user_inputs)
    wanted = {"constants": constants, "weights": buffers}
    configs = _payload_configs(archive, prefix, wanted)
    files = {
        folder: {str(_get(configs[folder], name, "path_name")) for name in wanted[folder].values()}
        for folder in configs
    }
    _check_members(archive, prefix, files.get("constants", set()), files.get("weights", set()))
    program = Program(
        nodes,
        user_inputs[0],
        dict(zip(user_inputs[1:], arg_names[1:], strict=True)),
        _constants(archive, prefix, wanted, configs),
        output,
        metas,
        row_count,
    )
    return (program if row_count else program.for_rows(None)), [str(a) for a in arg_names[1:]]


def _check_versions(archive: zipfile.ZipFile, prefix: str, doc: Any) -> None:
    """Refuse an archive this reader would misread: another serialisation schema (major
    version, as torch.export.load checks), ATen operators newer than this torch's, another
    archive format, version or byte order (constants are read as this machine's bytes)."""
    schema = _get(doc, "schema_version")
    major, minor = _get(schema, "major"), _get(schema, "minor")
    if major != SCHEMA_VERSION[0]:
        raise refuse(
            f"an archive of torch.export's schema version {SCHEMA_VERSION[0]}.x (torch "
            f"{torch.__version__.split('+')[0]})",
            f"{major}.{minor}",
        )
    aten = doc.get("opset_version", {}).get("aten") if isinstance(doc, dict) else None
    newest = torch._C._get_max_operator_version()
    if type(aten) is not int or aten > newest:
        raise refuse(f"the ATen operator set version {newest} or older", aten)
    expected = {
        "archive_format": ARCHIVE_FORMAT_VALUE,
        "archive_version": str(ARCHIVE_VERSION_VALUE),
        "byteorder": sys.byteorder,
    }
    for member, value in expected.items():
        if f"{prefix}{member}" in archive.namelist():
            found = _member(archive, f"{prefix}{member}").decode(errors="replace").strip()
            if found != value:
                raise refuse(f"{member} {value!r}", found)


def _row_count(doc: Any, metas: dict[str, TensorMeta], user_inputs: list[str]) -> RowCount | None:
    """The program's one symbolic size, which must be the first dimension of a data input
    (params static), with its exported range; None for a static program."""
    symbols = sorted({s for m in metas.values() for s in m.shape if isinstance(s, str)})
    if not symbols:
        return None
    if len(symbols) > 1:
        raise refuse("at most one symbolic size (the data's row count)", symbols)
    (symbol,) = symbols
    if any(isinstance(s, str) for s in metas[user_inputs[0]].shape):
        raise refuse("a params input of static shape", list(metas[user_inputs[0]].shape))
    for name in user_inputs[1:]:
        if symbol in metas[name].shape[1:]:  # mini-batches and Predict slice the first only
            raise refuse(
                f"the symbolic size {symbol!r} as the first dimension of data inputs only",
                f"input {name!r} of shape {list(metas[name].shape)}",
            )
    if not any(metas[name].shape[:1] == (symbol,) for name in user_inputs[1:]):
        raise refuse(f"the symbolic size {symbol!r} as the first dimension of a data input")
    bounds = doc.get("range_constraints", {}).get(symbol, {}) if isinstance(doc, dict) else {}
    low, high = bounds.get("min_val"), bounds.get("max_val")
    low = low if isinstance(low, int) and not isinstance(low, bool) and low > 0 else 1
    high = high if isinstance(high, int) and not isinstance(high, bool) else MAX_VALUE_ELEMENTS
    return RowCount(symbol, low, min(high, MAX_VALUE_ELEMENTS))
