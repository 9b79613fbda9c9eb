"""The objective interface: a validated problem whose loss is a function of flat parameters.

Parameters travel through the engine as one flat 1-D tensor of `num_params` values; an
objective's `param_shape` says how it reads them (row-major), so the seed's 5x5 matrix is
a 25-vector whose Hessian is 25x25, exactly as the seed's `view(-1)` has it.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..errors import ResourceLimitError, ValidationError
from ..linalg import all_finite
from ..validation import FLOAT_DTYPES, require_no_extra

# The closed-form kernels an objective may have in hessian_service._C (csrc/): "system" (loss,
# gradient and dense Hessian, op hessian::<name>_system), "newton_step" (the fused unary step,
# _C.<name>_newton_step), both called with `native_args()`, and "block_product" (V -> B V,
# `native_product_op` and `native_product_inputs`, bound in backends/native/products.py).
NATIVE_KERNELS = frozenset({"system", "newton_step", "block_product"})
# values one evaluation may hold, rows x units of a width option (the MLP's hidden and output
# units, softmax's classes): 512 MiB in float64
MAX_FORWARD_VALUES = 1 << 26


def check_forward_values(rows: int, units: int, field: str, unit_name: str) -> None:
    """Refuse rows whose evaluation would hold over MAX_FORWARD_VALUES values, rows x units
    (kept for the derivatives): a small request must not allocate gigabytes."""
    if rows * units > MAX_FORWARD_VALUES:
        raise ResourceLimitError(
            field,
            f"{rows} rows x {units} {unit_name} = {rows * units} values in an evaluation, "
            f"over the limit of {MAX_FORWARD_VALUES} (fewer rows, or fewer {unit_name})",
        )


class Objective(ABC):
    """A catalogue objective bound to its validated data and options.

    Subclasses set `name`, `data_fields` and `option_names`, validate in `_setup` and
    define `loss`. Objectives with a model-output structure (loss = output_loss(outputs)
    + regulariser) set `supports_ggn` and define `outputs`, `output_loss`, `regulariser`,
    which the Gauss-Newton matrix is built from; `has_curvature` / `require_curvature` are
    the one check every entry derives from that capability. `native_kernels` (a subset of
    NATIVE_KERNELS, called with `native_args()`) and `closed_form_system` declare the other
    capabilities the backends read; no other module lists objectives by name. Objectives
    whose loss is invariant along fixed parameter directions (a gauge) override `project_step`.
    """

    name: ClassVar[str]
    data_fields: ClassVar[tuple[str, ...]] = ()
    option_names: ClassVar[tuple[str, ...]] = ()
    # the options the server fills from its own flags (not sent by a caller, not in the proto)
    server_option_names: ClassVar[tuple[str, ...]] = ()
    supports_ggn: ClassVar[bool] = False
    # convex in the parameters for every data and options: its Hessian is positive
    # semi-definite everywhere, so a negative eigenvalue of the computed matrix is rounding
    convex: ClassVar[bool] = False
    row_fields: ClassVar[tuple[str, ...]] = ()
    native_kernels: ClassVar[frozenset[str]] = frozenset()
    closed_form_system: ClassVar[bool] = False  # torch closed-form dense system (curvature/mlp)
    # the fused "newton_step" kernel reads contiguous parameters of any shape (mse's is
    # elementwise), so the seed's 5x5 matrix is passed as it is instead of flattened first
    native_step_any_shape: ClassVar[bool] = False
    # the "block_product" kernel's op (None: hessian::<name>_block_product) and its per-point
    # inputs, (argument name, the op computing it once per point) pairs (logistic weights)
    native_product_op: ClassVar[str | None] = None
    native_product_inputs: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, when the class is defined, native kernels it cannot declare."""
        super().__init_subclass__(**kwargs)
        unknown = set(cls.native_kernels) - NATIVE_KERNELS
        if unknown:
            raise TypeError(
                f"{cls.__name__}.native_kernels: expected a subset of {sorted(NATIVE_KERNELS)}, "
                f"got unknown {sorted(unknown)}"
            )
        called = sorted(cls.native_kernels & {"system", "newton_step"})
        if called and cls.native_args is Objective.native_args:
            raise TypeError(
                f"{cls.__name__}.native_kernels declares {called}, which are called with "
                "native_args(), but the class does not define native_args()"
            )

    def __init__(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        require_no_extra(data, set(self.data_fields), "data")
        require_no_extra(options, set(self.option_names), "options")
        self.data: dict[str, torch.Tensor] = {}
        self.options: dict[str, Any] = {}
        self.dtype: torch.dtype | None = None
        self.param_shape: tuple[int, ...] = ()
        self._setup(data, options)

    @abstractmethod
    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        """Validate data and options, set `self.data`, `self.options`, `dtype`, `param_shape`."""

    @abstractmethod
    def loss(self, params: torch.Tensor) -> torch.Tensor:
        """The scalar loss at flat `params` (differentiable, 0-dim tensor)."""

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector."""
        n = 1
        for s in self.param_shape:
            n *= s
        return n

    @property
    def device(self) -> torch.device:
        """Device of the objective's data (CPU for data-free objectives)."""
        for t in self.data.values():
            return t.device
        return torch.device("cpu")

    @property
    def described_as(self) -> str:
        """How refusals name this objective: its catalogue name."""
        return self.name

    def check_params(self, params: Any, field: str = "params") -> torch.Tensor:
        """Validate caller parameters and return them flat, in the compute dtype, detached."""
        if not isinstance(params, torch.Tensor):
            raise ValidationError(field, "a torch.Tensor", type(params).__name__)
        if params.dtype not in FLOAT_DTYPES:
            raise ValidationError(field, "dtype float32 or float64", str(params.dtype))
        if params.numel() != self.num_params:
            raise ValidationError(
                field,
                f"{self.num_params} values (shape {list(self.param_shape)}) for {self.name}",
                f"{params.numel()} values (shape {list(params.shape)})",
            )
        if params.dim() > 1 and not self.accepts_shape(tuple(params.shape)):
            raise ValidationError(
                field,
                f"a flat vector or shape {list(self.param_shape)} for {self.name}",
                f"shape {list(params.shape)}",
            )
        if not all_finite(params):
            raise ValidationError(field, "finite values", "NaN or inf")
        dtype = self.dtype or params.dtype
        cast = params.detach().reshape(-1).to(dtype=dtype, device=self.device).clone()
        if cast.dtype != params.dtype and not all_finite(cast):  # 1e150 to float32: inf
            name, top = str(dtype).removeprefix("torch."), torch.finfo(dtype).max
            expected = f"values this {name} problem holds (|x| <= {top:.4g})"
            raise ValidationError(field, expected, f"|x| up to {float(params.abs().max()):.4g}")
        return cast

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether params of `shape` (as many values) are this objective's: its shape up to
        sizes of 1 ((n, 1) for (n,)); (3, 2) for (2, 3) is a transposition, refused."""
        return [s for s in shape if s != 1] == [s for s in self.param_shape if s != 1]

    def compute_dtype(self, params: torch.Tensor | None = None) -> torch.dtype:
        """The compute dtype: the data's, or the parameters' for data-free objectives."""
        if self.dtype is not None:
            return self.dtype
        return params.dtype if params is not None else torch.float64

    def init_params(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A default starting point (zeros unless the objective knows better)."""
        return torch.zeros(self.num_params, dtype=self.compute_dtype(), device=self.device)

    @property
    def num_rows(self) -> int:
        """Number of data rows (samples) the loss averages over; 0 for objectives without rows."""
        return int(self.data[self.row_fields[0]].shape[0]) if self.row_fields else 0

    def subsample(self, indices: torch.Tensor) -> Objective:
        """The same objective on the data rows `indices` (mini-batch curvature products).

        The loss is a mean over rows, so the sub-sample's loss estimates the full one; data
        is indexed, options and parameter layout are shared.
        """
        if not self.row_fields:
            raise ValidationError("objective", f"an objective with data rows, not {self.name}")
        sub = copy.copy(self)
        sub.data = {
            k: (v.index_select(0, indices) if k in self.row_fields else v)
            for k, v in self.data.items()
        }
        return sub

    def native_args(self) -> tuple[Any, ...]:
        """The data and options the native kernels take after the parameters, in order."""
        raise NotImplementedError(f"{self.name} has no native kernels")

    def has_curvature(self, kind: str) -> bool:
        """Whether this objective forms curvature `kind` (hessian always; gauss_newton with
        a Gauss-Newton form)."""
        return kind != "gauss_newton" or self.supports_ggn

    def require_curvature(self, kind: str, field: str = "options.curvature") -> None:
        """Refuse, naming `field`, a curvature kind this objective cannot form.

        The one refusal of Gauss-Newton curvature without a Gauss-Newton form: NewtonStep,
        ComputeHessian, AnalyzeCurvature, StartRun and ResumeRun all reach it.
        """
        if not self.has_curvature(kind):
            raise ValidationError(
                field,
                f"a Hessian-based method/curvature for {self.name} (it has no Gauss-Newton "
                "form: its loss is not a loss of model outputs)",
                "gauss_newton curvature",
            )

    @property
    def has_gauge(self) -> bool:
        """Whether the loss may be invariant along some parameter directions (`project_step`
        is overridden; it may still be the identity for some options): dense steps and CG
        iterates are then projected off them."""
        return type(self).project_step is not Objective.project_step

    def project_step(self, step: torch.Tensor) -> torch.Tensor:
        """`step` without its component along directions the loss is invariant to (none here).

        A Newton solve of a singular Hessian can put rounding-sized pivots' noise along such
        a gauge direction; projecting every dense step keeps the iterates from drifting.
        """
        return step

    def outputs(self, params: torch.Tensor) -> torch.Tensor:
        """Model outputs at `params` (objectives with `supports_ggn`)."""
        raise NotImplementedError(f"{self.name} has no output structure for Gauss-Newton")

    def predict(
        self, params: Any, inputs: torch.Tensor | None = None, max_values: int | None = None
    ) -> torch.Tensor:
        """`outputs` at `params` on new input rows `inputs` (shaped like data X; None: the
        problem's own X), so callers never re-implement the forward pass or the layout.
        `max_values`: refuse, before computing them, more output values than that."""
        x = self.check_params(params)
        if not self.supports_ggn:
            raise ValidationError("problem", f"an objective with model outputs, not {self.name}")
        field = self.input_field
        if inputs is None:
            if max_values is not None and field is not None:
                rows = int(self.data[field].shape[0])
                self._check_outputs_fit(x, field, rows, max_values, "problem", own_rows=True)
            return self.outputs(x).detach()
        if field is None:
            raise ValidationError("inputs", f"nothing: {self.name} takes no input rows", "a tensor")
        own = self.data[field]
        if inputs.dim() != own.dim() or tuple(inputs.shape[1:]) != tuple(own.shape[1:]):
            row = ", ".join(str(d) for d in ("rows", *own.shape[1:]))
            expected = f"a {own.dim()}-D array shaped ({row}) (rows like the problem's {field})"
            raise ValidationError("inputs", expected, f"shape {tuple(inputs.shape)}")
        # integer (or bool) rows of real-valued X are the reals they are, cast below (they
        # were refused, while CreateProblem took the same X); real rows for integer X are not
        # (2.7 as an index was 2, unsaid)
        real_rows = inputs.is_floating_point() or inputs.dtype == torch.bool
        if not own.is_floating_point() and real_rows:
            expected = f"integers ({own.dtype}), like the problem's {field}"
            raise ValidationError("inputs.dtype", expected, str(inputs.dtype))
        rows = int(inputs.shape[0])
        self.check_rows(rows, "inputs")
        if max_values is not None:
            self._check_outputs_fit(x, field, rows, max_values, "inputs", own_rows=False)
        fresh = copy.copy(self)
        fresh.data = {**self.data, field: inputs.to(own.dtype)}
        return fresh.outputs(x).detach()

    @property
    def input_field(self) -> str | None:
        """The data tensor whose rows Predict replaces with new inputs (None: it has none)."""
        return "X" if "X" in self.data else None

    def _check_outputs_fit(
        self,
        x: torch.Tensor,
        inputs_of: str,
        rows: int,
        max_values: int,
        field: str,
        own_rows: bool,
    ) -> None:
        """Refuse, naming `field`, `rows` rows (of data `inputs_of`) whose outputs are over
        `max_values` values (before they are computed); `own_rows`: the problem's own
        (Predict without inputs)."""
        width = self.output_width(x, inputs_of)
        if rows * width > max_values:
            whose, when = ("its ", " (Predict without inputs)") if own_rows else ("", "")
            raise ResourceLimitError(
                field,
                f"{whose}{rows} rows of {width} outputs each{when} are over the {max_values} "
                "output values a response can carry",
            )

    def check_rows(self, rows: int, field: str) -> None:  # noqa: B027 (an optional hook)
        """Refuse (naming `field`) `rows` input rows whose evaluation would be too large;
        objectives whose cost grows with a width option (MLP, softmax) fill it in."""

    def output_width(self, params: torch.Tensor, inputs_of: str) -> int:
        """Model outputs per input row of data `inputs_of` (the same at any params): the
        outputs on the problem's first row alone."""
        one = copy.copy(self)
        one.data = {**self.data, inputs_of: self.data[inputs_of][:1]}
        return one.outputs(params).numel()

    def output_loss(self, outputs: torch.Tensor) -> torch.Tensor:
        """The data term of the loss as a function of the model outputs (`supports_ggn`)."""
        raise NotImplementedError(f"{self.name} has no output structure for Gauss-Newton")

    def regulariser(self, params: torch.Tensor) -> torch.Tensor:
        """The parameter-only term of the loss (zero unless overridden)."""
        return params.new_zeros(())

    def held_tensors(self) -> list[torch.Tensor]:
        """The tensors this objective keeps alive (its data and attributes): what a cache of
        built objectives counts."""
        values = [*vars(self).values(), *self.data.values()]
        return [v for v in values if isinstance(v, torch.Tensor)]

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (name, options, parameter shape, data shapes)."""
        return {
            "objective": self.name,
            "options": dict(self.options),
            "param_shape": list(self.param_shape),
            "num_params": self.num_params,
            "data": {k: list(v.shape) for k, v in self.data.items()},
        }
