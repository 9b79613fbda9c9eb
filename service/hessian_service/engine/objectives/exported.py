"""`exported`: a caller's own loss, a torch.export program verified by `export_verify`.

The program takes `(params, **data)` with params shaped `param_shape` and returns the scalar
loss, or (with `output_loss` mse / cross_entropy) the model outputs that loss is applied to,
which gives the objective a Gauss-Newton form. Curvature comes from autograd through the
interpreted graph, exactly as for the catalogue's pure-torch objectives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ResourceLimitError, ValidationError
from ..validation import FLOAT_DTYPES
from .base import Objective
from .export_compile import (
    CompiledFailed,
    CompiledLoss,
    CompiledProgram,
    compile_or_none,
    use_compiled,
)
from .export_verify import Program, load_program
from .losses import cross_entropy, mean_squared

OUTPUT_LOSSES = ("", "mse", "cross_entropy")
EVAL_SECONDS = 60.0  # wall-clock limit of one evaluation of the program
log = logging.getLogger(__name__)


def _interpreter_passed(failed: CompiledFailed | None) -> None:
    """Log a compiled call that failed where the interpreter did not: no error of the
    program's (the interpreter would have named its node), so a defect to look at."""
    if failed is not None:
        log.warning("compiled evaluation failed where the interpreter did not: %s", failed)


class Exported(Objective):
    """A verified exported program with its data tensors (see the module docstring)."""

    name = "exported"
    # the server's settings for every exported program (flags), not the problem's own fields
    server_option_names = ("compile", "evaluation_seconds")
    option_names = ("program", "param_shape", "output_loss", "target", *server_option_names)

    def __init__(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        self.data_fields = tuple(data)  # checked against the program's inputs in _setup
        super().__init__(data, options)

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        blob = options.get("program", b"")
        if not isinstance(blob, bytes) or not blob:
            raise ValidationError("options.program", "the bytes of torch.export.save", "nothing")
        shape = tuple(int(s) for s in options.get("param_shape", ()))
        if not shape or any(s < 1 for s in shape):
            raise ValidationError(
                "options.param_shape", "the shape of params (sizes >= 1)", list(shape)
            )
        output_loss = str(options.get("output_loss", ""))
        if output_loss not in OUTPUT_LOSSES:
            raise ValidationError("options.output_loss", "'' | mse | cross_entropy", output_loss)
        target = str(options.get("target", "")) or "y"
        self.eval_seconds = float(options.get("evaluation_seconds", EVAL_SECONDS))
        self.compiled: CompiledProgram | None = None
        self._compiled_data: dict[str, torch.Tensor] | None = None  # the data compiled in
        program, keys = load_program(blob)
        self._template = program  # unbound when the program declares a row count
        wanted = set(keys) | ({target} if output_loss else set())
        for key in sorted(set(data) ^ wanted):
            where = "the program's inputs" if key in data else "problem.data"
            raise ValidationError(
                f"data.{key}", f"data tensors exactly {sorted(wanted)}", f"{key!r} not in {where}"
            )
        rows = program.row_inputs()
        if rows:  # mini-batches and Predict index these (and the target) by row
            self.row_fields = (*rows, *([target] if output_loss else []))
            program = program.for_rows(int(data[rows[0]].shape[0]) if data[rows[0]].dim() else 0)
        self.program: Program = program
        params_meta = program.metas[program.params_name]
        if params_meta.shape != shape or params_meta.dtype not in FLOAT_DTYPES:
            raise ValidationError(
                "options.param_shape",
                f"the program's params input, float32/64 of shape {list(params_meta.shape)}",
                f"{list(shape)} ({params_meta.dtype})",
            )
        for placeholder, key in program.data_names.items():
            meta, tensor = program.metas[placeholder], data[key]
            if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
                raise ValidationError(
                    f"data.{key}",
                    f"{meta.dtype} of shape {list(meta.shape)} (as exported)",
                    f"{tensor.dtype} of shape {list(tensor.shape)}",
                )
        out = program.metas[program.output]
        if not output_loss and out.shape != ():
            raise ValidationError(
                "problem.exported",
                f"a scalar output (the loss), or output_loss set (node {program.output!r})",
                f"shape {list(out.shape)}",
            )
        self.data = dict(data)
        self.options = {"param_shape": list(shape), "output_loss": output_loss, "target": target}
        self.dtype = params_meta.dtype
        self.param_shape = shape
        self.supports_ggn = bool(output_loss)
        if output_loss:
            self._check_target(out.shape, target, output_loss)
        with torch.enable_grad():  # refuse what fails now, and an output with no gradient
            value = self._evaluate(torch.zeros(shape, dtype=self.dtype, requires_grad=True))
        if not value.dtype.is_floating_point:
            raise ValidationError("problem.exported", "a floating-point output", value.dtype)
        if not value.requires_grad:
            raise ValidationError(
                "problem.exported",
                "an output that depends on params through differentiable operations (methods "
                "need its gradient)",
                "none: params reach it only through detach, comparisons or integer casts, or "
                "not at all",
            )
        if options.get("compile", False):
            self.compiled = compile_or_none(
                program,
                [*(data[key] for key in program.data_names.values()), *program.constants.values()],
                torch.zeros(shape, dtype=self.dtype),
                self.output_loss if output_loss else torch.squeeze,
            )
            self._compiled_data = self.data

    def _compiled(self) -> CompiledProgram | None:
        """The compiled program, if on and this objective still holds the data it was compiled
        with (a copy for Predict on new inputs, or a mini-batch, holds other data)."""
        return self.compiled if self._compiled_data is self.data else None

    def _check_target(self, out_shape: tuple[int, ...], target: str, loss: str) -> None:
        y = self.data[target]
        if loss == "mse":
            if tuple(y.shape) != out_shape or y.dtype != self.dtype:
                raise ValidationError(
                    f"data.{target}",
                    f"{self.dtype} of the outputs' shape {list(out_shape)}",
                    f"{y.dtype} {list(y.shape)}",
                )
            return
        if len(out_shape) != 2 or y.dtype != torch.int64 or tuple(y.shape) != out_shape[:1]:
            raise ValidationError(
                f"data.{target}",
                f"int64 labels of shape [{out_shape[0] if out_shape else '?'}] for outputs "
                f"(N, classes); outputs are {list(out_shape)}",
                f"{y.dtype} {list(y.shape)}",
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= out_shape[1]:
            raise ValidationError(
                f"data.{target}", f"labels in [0, {out_shape[1]})", f"range [{lo}, {hi}]"
            )

    def _bound(self) -> Program:
        """The program bound to this objective's data rows (a mini-batch's or new inputs'
        when they differ from the problem's)."""
        if not self.row_fields:
            return self.program
        rows = int(self.data[self.row_fields[0]].shape[0])
        return self.program if rows == self.program.rows else self._template.for_rows(rows)

    def _evaluate(self, params: torch.Tensor) -> torch.Tensor:
        """The program's output: compiled when on and no autograd graph is wanted."""
        value = None
        compiled = self._compiled()
        failed = None
        if compiled is not None and use_compiled(params) is False:
            try:
                value = compiled.forward(params, self.eval_seconds)
            except CompiledFailed as exc:  # the interpreter below names the node
                failed = exc
        program = self._bound()
        if value is None:
            value = program.run(params.reshape(self.param_shape), self.data, self.eval_seconds)
            _interpreter_passed(failed)
        expected = program.metas[program.output].shape
        if tuple(value.shape) != expected:
            raise ValidationError(
                "problem.exported",
                f"an output of the declared shape {list(expected)}",
                f"shape {list(value.shape)}",
            )
        return value

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        compiled = self._compiled()
        if compiled is not None and use_compiled(params):
            try:
                return CompiledLoss.apply(params, compiled, self._loss, self.eval_seconds)
            except CompiledFailed as exc:  # the interpreter below names the node
                value = self._loss(params)
                _interpreter_passed(exc)
                return value
        return self._loss(params)

    def _loss(self, params: torch.Tensor) -> torch.Tensor:
        if self.supports_ggn:
            return self.output_loss(self.outputs(params))
        return self._evaluate(params)

    def outputs(self, params: torch.Tensor) -> torch.Tensor:
        if not self.supports_ggn:
            raise NotImplementedError("exported program without output_loss has no outputs")
        return self._evaluate(params)

    def predict(
        self, params: Any, inputs: torch.Tensor | None = None, max_values: int | None = None
    ) -> torch.Tensor:
        """The base Predict, with the row count of `inputs` checked first against what the
        program takes (naming `inputs`, not the graph node it would break)."""
        row_inputs = self._template.row_inputs()
        if inputs is not None and len(row_inputs) > 1:
            raise ValidationError(
                "inputs",
                f"a program with one row input besides its target (this one has {row_inputs}: "
                "Predict without inputs gives the outputs on the problem's own rows)",
                "new rows",
            )
        field = self.input_field
        own = self.data[field] if field is not None else None
        rows_like_own = (
            inputs is not None
            and own is not None
            and inputs.dim() == own.dim() >= 1
            and inputs.shape[1:] == own.shape[1:]
        )
        if rows_like_own:  # other shapes: the base refusal names what rows must look like
            self._check_input_rows(int(inputs.shape[0]), field)
        try:
            return super().predict(params, inputs, max_values)
        except ValidationError as exc:
            if inputs is None or exc.field != "problem.exported":
                raise
            # the program evaluated on its own rows when it was created: these rows broke it
            # (an index past an embedding's table, say)
            raise ValidationError("inputs", "rows the program evaluates", str(exc)) from None

    def check_rows(self, rows: int, field: str) -> None:
        """The program bound to `rows` (sizes declared, bounded, checked on meta tensors):
        its size refusal names `field` (new input rows), not the program."""
        if self._template.row_count is None or rows == self.program.rows:
            return
        try:
            self._template.for_rows(rows)
        except ResourceLimitError as exc:
            raise ResourceLimitError(field, f"{rows} rows: {exc}") from None

    @property
    def input_field(self) -> str | None:
        """The program's row input (besides its target) whatever its name: Predict's new rows
        replace it; a program without declared rows, its input named X."""
        row_inputs = self._template.row_inputs()
        if row_inputs:
            return row_inputs[0]
        return "X" if "X" in self.data else None

    def output_width(self, params: torch.Tensor, inputs_of: str) -> int:
        """Outputs per row from the program's declared output shape (no evaluation)."""
        meta = self.program.metas[self.program.output]
        rows = int(self.data[inputs_of].shape[0])
        return math.prod(int(s) for s in meta.shape) // max(rows, 1)

    def _check_input_rows(self, rows: int, field: str) -> None:
        """Refuse `rows` new input rows of data `field` where the program cannot take them:
        outside its exported row range, or other than the problem's rows for a static
        program."""
        count = self._template.row_count
        if field in self.row_fields and count is not None:
            if not count.low <= rows <= count.high:
                raise ValidationError(
                    "inputs",
                    f"between {count.low} and {count.high} rows (the program's exported row range)",
                    f"{rows} rows",
                )
            return
        declared = int(self.data[field].shape[0])
        if rows != declared:
            raise ValidationError(
                "inputs",
                f"{declared} rows: the program was exported with a static row count (export "
                f"it with rows=('{field}',) to predict on other row counts)",
                f"{rows} rows",
            )

    def output_loss(self, outputs: torch.Tensor) -> torch.Tensor:
        y = self.data[self.options["target"]]
        if self.options["output_loss"] == "mse":
            return mean_squared(outputs, y)
        return cross_entropy(outputs, y)

    def init_params(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Small U(-1/sqrt(n), 1/sqrt(n)) values: zeros would be a saddle of most networks."""
        bound = 1.0 / math.sqrt(self.num_params)
        u = torch.rand(self.num_params, generator=generator, dtype=self.dtype)
        return u * (2 * bound) - bound

    def held_tensors(self) -> list[torch.Tensor]:
        """The base's tensors and the program's constants and buffers."""
        return [*super().held_tensors(), *self.program.constants.values()]

    def describe(self) -> dict[str, Any]:
        """The base summary plus the program's size in nodes."""
        summary = super().describe()
        summary["nodes"] = len(self.program.nodes)
        return summary
