"""`mlp`: a fully connected network (nn.Linear layers) with an mse or cross-entropy loss.

The flat parameter vector holds, layer by layer, the weight W (out, in) row-major followed
by its bias b (out,), exactly as `torch.nn.utils.parameters_to_vector` lays out an
`nn.Sequential` of `nn.Linear` layers. Hidden layers use the activation, the last is linear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ValidationError
from ..validation import (
    option_choice,
    option_float,
    require_same_dtype,
    require_tensor,
)
from .base import Objective, check_forward_values
from .losses import cross_entropy, l2_penalty, mean_squared

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}
LOSSES = ("mse", "cross_entropy")


def _layer_sizes(options: Mapping[str, Any], in_features: int) -> list[int]:
    field = "options.layer_sizes"
    if "layer_sizes" not in options:
        raise ValidationError(field, "a list of layer widths [in, ..., out]", "nothing")
    sizes = options["layer_sizes"]
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
        raise ValidationError(field, "a list of at least 2 layer widths", repr(sizes))
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValidationError(field, "integers >= 1", repr(sizes))
    if sizes[0] != in_features:
        raise ValidationError(
            field, f"first width {in_features} to match data.X columns", repr(list(sizes))
        )
    return [int(s) for s in sizes]


def _check_activations(rows: int, sizes: Sequence[int], field: str) -> None:
    """Every layer's outputs (hidden and output units) are kept for the derivatives."""
    check_forward_values(rows, sum(sizes[1:]), field, "hidden and output units")


class MLP(Objective):
    """An MLP on X (N, in); y (N, out) float for mse, (N,) int64 class labels for cross_entropy.

    Loss = output_loss(network(X)) + 0.5 l2 ||params||^2 (weights and biases penalised).
    GELU is the exact (erf) form, torch's default.
    """

    name = "mlp"
    data_fields = ("X", "y")
    option_names = ("layer_sizes", "activation", "loss", "l2")
    supports_ggn = True
    row_fields = ("X", "y")
    closed_form_system = True

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        x = require_tensor(data, "X", ndim=2)
        sizes = _layer_sizes(options, x.shape[1])
        _check_activations(x.shape[0], sizes, "options.layer_sizes")
        activation = option_choice(options, "activation", "tanh", tuple(ACTIVATIONS))
        loss = option_choice(options, "loss", "mse", LOSSES)
        l2 = option_float(options, "l2", 0.0, minimum=0.0)
        n, out = x.shape[0], sizes[-1]
        if loss == "mse":
            y = require_tensor(data, "y", kind="float")
            require_same_dtype("data.y", y, x.dtype)
            if y.dim() == 1 and out == 1:
                y = y.reshape(-1, 1)
            if tuple(y.shape) != (n, out):
                raise ValidationError("data.y", f"shape ({n}, {out})", f"shape {tuple(y.shape)}")
        else:
            if out < 2:
                raise ValidationError(
                    "options.layer_sizes", "at least 2 outputs for cross_entropy", repr(sizes)
                )
            y = require_tensor(data, "y", ndim=1, kind="int")
            if y.shape[0] != n:
                raise ValidationError("data.y", f"length {n} to match data.X", y.shape[0])
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= out:
                raise ValidationError("data.y", f"integers in [0, {out})", f"range [{lo}, {hi}]")
        self.data = {"X": x, "y": y}
        self.options = {"layer_sizes": sizes, "activation": activation, "loss": loss, "l2": l2}
        self.dtype = x.dtype
        self._act = ACTIVATIONS[activation]
        # (weight start, fan_out, fan_in, bias start) per layer, in flat-vector order
        self._layers: list[tuple[int, int, int, int]] = []
        offset = 0
        for fan_in, fan_out in pairwise(sizes):
            self._layers.append((offset, fan_out, fan_in, offset + fan_out * fan_in))
            offset += fan_out * fan_in + fan_out
        self.param_shape = (offset,)
        self._piece_sizes = [
            n for _, fan_out, fan_in, _ in self._layers for n in (fan_out * fan_in, fan_out)
        ]

    def check_rows(self, rows: int, field: str) -> None:
        """Rows x hidden and output units, bounded."""
        _check_activations(rows, self.options["layer_sizes"], field)

    def outputs(self, params: torch.Tensor) -> torch.Tensor:
        h = self.data["X"]
        last = len(self._layers) - 1
        # one split, not a slice per layer: each slice's derivative (backward, and forward
        # mode's in a Hessian product) is a full-length vector, depth x params in all
        pieces = params.split(self._piece_sizes)
        for i, (_, fan_out, fan_in, _) in enumerate(self._layers):
            w, b = pieces[2 * i].reshape(fan_out, fan_in), pieces[2 * i + 1]
            h = F.linear(h, w, b)
            if i < last:
                h = self._act(h)
        return h

    def output_loss(self, outputs: torch.Tensor) -> torch.Tensor:
        y = self.data["y"]
        if self.options["loss"] == "mse":
            return mean_squared(outputs, y)
        return cross_entropy(outputs, y)

    def regulariser(self, params: torch.Tensor) -> torch.Tensor:
        return l2_penalty(params, self.options["l2"])

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        return self.output_loss(self.outputs(params)) + self.regulariser(params)

    def init_params(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """nn.Linear-style U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every W and b, in layout order."""
        device = generator.device if generator is not None else self.device
        parts = []
        for _, fan_out, fan_in, _ in self._layers:
            bound = 1.0 / math.sqrt(fan_in)
            for numel in (fan_out * fan_in, fan_out):
                u = torch.rand(numel, generator=generator, dtype=self.dtype, device=device)
                parts.append(u * (2 * bound) - bound)
        return torch.cat(parts).to(self.device)
