"""The one selector: which backend assembles, solves and multiplies by the curvature, per call.

`autograd` (pure Python, torch autograd) always works. `native` is the compiled extension
`hessian_service._C`, loaded through `native.dense`; when it fails to import, the real
exception is logged once and kept for `native_status()`. `closed_form` assembles the mlp's
Hessian and Gauss-Newton matrix from explicit formulas (`curvature.mlp`, torch ops, no
autograd). `auto` and `native` use native where it supports the objective, dtype and
device, else closed_form where it applies, else autograd; the native solve serves
objectives that have no native assembly. `autograd` is the reference path throughout.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .. import linalg
from ..budget import check_dense_budget
from ..curvature import autograd as curvature
from ..curvature import mlp as mlp_curvature
from ..curvature.products import (
    BlockProduct,
    Product,
    as_vector_product,
    autograd_block_product,
    ggn_product,
    hessian_product,
)
from ..errors import UnavailableError, UnknownNameError, ValidationError
from ..objectives.base import Objective
from ..options import BACKENDS
from .native import products

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What a curvature backend offers the methods."""

    name: str

    def supports_system(self, objective: Objective, params: torch.Tensor, kind: str) -> bool:
        """Whether `newton_system` handles this objective, dtype, device and curvature kind."""

    def supports_solve(self, h: torch.Tensor) -> bool:
        """Whether the solves handle this matrix's dtype and device."""

    def newton_system(
        self, objective: Objective, params: torch.Tensor, kind: str, budget_bytes: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, gradient and dense curvature matrix (Hessian or Gauss-Newton)."""

    def solve(self, h: torch.Tensor, g: torch.Tensor, damping: float) -> linalg.SolveResult:
        """Damped Cholesky Newton direction."""

    def saddle_free(
        self, h: torch.Tensor, g: torch.Tensor, floor: float, rows: int = 0
    ) -> linalg.SolveResult:
        """Saddle-free Newton direction with the negative-eigenvalue count (linalg's
        tolerance for a matrix summed over `rows` data rows)."""


class AutogradBackend:
    """The pure-Python path: torch autograd assembly and ATen/LAPACK solves."""

    name = "autograd"

    def supports_system(self, objective: Objective, params: torch.Tensor, kind: str) -> bool:
        return objective.has_curvature(kind)

    def supports_solve(self, h: torch.Tensor) -> bool:
        return True

    def newton_system(
        self, objective: Objective, params: torch.Tensor, kind: str, budget_bytes: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if kind == "gauss_newton":
            return curvature.gauss_newton(objective, params, budget_bytes=budget_bytes)
        return curvature.newton_system(objective, params, budget_bytes=budget_bytes)

    def solve(self, h: torch.Tensor, g: torch.Tensor, damping: float) -> linalg.SolveResult:
        return linalg.damped_cholesky_solve(h, g, damping)

    def saddle_free(
        self, h: torch.Tensor, g: torch.Tensor, floor: float, rows: int = 0
    ) -> linalg.SolveResult:
        return linalg.saddle_free_direction(h, g, floor, rows)


AUTOGRAD = AutogradBackend()


class ClosedFormBackend(AutogradBackend):
    """Closed-form mlp assembly (one forward/backward pass and GEMMs); ATen/LAPACK solves."""

    name = "closed_form"

    def supports_system(self, objective: Objective, params: torch.Tensor, kind: str) -> bool:
        return objective.closed_form_system and params.dtype in (torch.float32, torch.float64)

    def newton_system(
        self, objective: Objective, params: torch.Tensor, kind: str, budget_bytes: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_dense_budget(params.numel(), budget_bytes, params.dtype)
        return mlp_curvature.mlp_newton_system(objective, params, kind)


CLOSED_FORM = ClosedFormBackend()


def _assembler(
    native: Backend | None, objective: Objective, params: torch.Tensor, kind: str
) -> Backend:
    """The first of native, closed_form, autograd that assembles this system."""
    for backend in (native, CLOSED_FORM):
        if backend is not None and backend.supports_system(objective, params, kind):
            return backend
    return AUTOGRAD


@functools.cache
def _load_native() -> tuple[Any | None, str]:
    """Import the native backend once; on failure log the real exception once."""
    try:
        from .native.dense import NativeBackend
    except Exception as exc:  # any import failure means: serve with autograd
        reason = f"hessian_service._C did not load: {type(exc).__name__}: {exc}"
        log.warning("native backend unavailable, using autograd: %s", reason)
        return None, reason
    return NativeBackend(), "hessian_service._C loaded"


def native_status() -> tuple[bool, str]:
    """(available, why): whether the extension loaded, and the real reason if not."""
    backend, reason = _load_native()
    return backend is not None, reason


@dataclass(frozen=True)
class ResolvedBackend:
    """Who serves one call: `system` assembles the dense curvature (chosen when first read:
    Hessian-free callers read only `products`), `solver` solves with it, `products` (native |
    autograd) multiplies by it; `label` goes into every step record."""

    solver: Backend
    products: str
    assembler: Callable[[], Backend] = field(repr=False, compare=False)

    @functools.cached_property
    def system(self) -> Backend:
        """The backend that assembles the dense system (chosen once, on first read)."""
        return self.assembler()

    @property
    def label(self) -> str:
        if self.system.name == self.solver.name:
            return self.system.name
        return f"{self.system.name}+{self.solver.name}-solve"


def native_for(requested: str, params: torch.Tensor) -> Any | None:
    """The native backend when `requested` (auto | native | autograd) should use it for
    tensors like `params`, else None; native requested where it cannot serve raises."""
    if requested == "autograd":
        return None
    native, reason = _load_native()
    if native is None:
        if requested == "native":
            raise UnavailableError("backend", f"native was requested but {reason}")
        return None
    if not native.supports_solve(params.new_empty((0, 0))):
        if requested == "native":
            raise UnavailableError(
                "backend", f"native does not support {params.dtype} on {params.device.type}"
            )
        return None
    return native


def resolve(
    requested: str, objective: Objective, params: torch.Tensor, kind: str = "hessian"
) -> ResolvedBackend:
    """The one choice of backends for a call: `requested` is auto, native or autograd.

    Native assembles and multiplies where the objective declares those kernels
    (`native_kernels`) and forms `kind`, and solves on every dtype/device it serves; the
    closed form assembles where the objective declares one; autograd serves the rest.
    """
    if requested not in BACKENDS:
        raise UnknownNameError("backend", requested, list(BACKENDS))
    if requested == "autograd":
        return ResolvedBackend(AUTOGRAD, "autograd", lambda: AUTOGRAD)
    native = native_for(requested, params)
    covered = "block_product" in objective.native_kernels and objective.has_curvature(kind)
    multiplier = "native" if native is not None and covered else "autograd"
    assembler = functools.partial(_assembler, native, objective, params, kind)
    return ResolvedBackend(native or AUTOGRAD, multiplier, assembler)


class CurvatureProducts:
    """The curvature products B v / B V at one point, from the backend `resolve` chose.

    Built lazily: each form is made when asked for, so a caller pays only for the ones it
    uses. `label` (native | autograd) names the backend for records and reports.
    """

    def __init__(
        self,
        objective: Objective,
        params: torch.Tensor,
        kind: str,
        label: str,
        rows: torch.Tensor | None,
    ) -> None:
        self.objective = objective
        self.params = params
        self.kind = kind
        self.label = label
        self.rows = rows
        self._native: BlockProduct | None = None
        if label == "native":
            if rows is not None and not objective.row_fields:
                raise ValidationError("rows", f"None for {objective.name}, which has no data rows")
            x = params.detach().reshape(-1).to(dtype=objective.compute_dtype(params))
            self._native = products.native_block_product(objective, x, rows)

    def vector(self, hvp_mode: str = "forward_over_reverse") -> Product:
        """v (n,) -> B v; hvp_mode picks the autograd Hessian product (native: exact)."""
        if hasattr(self.objective, "product_at"):  # evaluated elsewhere (asktell asks)
            return self.objective.product_at(self.params, self.kind)
        if self._native is not None:
            return as_vector_product(self._native)
        sub = self.objective
        if self.rows is not None:
            sub = sub.subsample(self.rows.to(sub.device))
        if self.kind == "gauss_newton":
            return ggn_product(sub, self.params)
        return hessian_product(sub, self.params, hvp_mode)

    def block(self, hvp_mode: str = "forward_over_reverse") -> BlockProduct:
        """V (n, k) -> B V (vmap'd over columns where the autograd product allows it)."""
        if self._native is not None:
            return self._native
        return autograd_block_product(self.objective, self.params, self.kind, self.rows, hvp_mode)

    def batched(self) -> BlockProduct:
        """A (b, n) batch of rows -> the (b, n) rows of their products."""
        native = self._native
        if native is not None:
            return lambda vs: native(vs.T).T
        return torch.func.vmap(self.vector())


def curvature_products(
    objective: Objective,
    params: torch.Tensor,
    backend: str = "auto",
    kind: str = "hessian",
    rows: torch.Tensor | None = None,
) -> CurvatureProducts:
    """The curvature products of `kind` at `params` (on data rows `rows`, None: all) from
    the backend `resolve` picks for them under the requested `backend`."""
    label = resolve(backend, objective, params, kind).products
    return CurvatureProducts(objective, params, kind, label, rows)


def curvature_block_product(
    objective: Objective,
    params: torch.Tensor,
    backend: str = "auto",
    rows: torch.Tensor | None = None,
    *,
    kind: str = "hessian",
    hvp_mode: str = "forward_over_reverse",
) -> tuple[BlockProduct, str]:
    """(V (n, k) -> B V, backend label) at `params`, on data rows `rows` (None: all rows)."""
    chosen = curvature_products(objective, params, backend, kind, rows)
    return chosen.block(hvp_mode), chosen.label


def fused_entry(objective: Objective) -> tuple[Any, tuple[Any, ...]] | None:
    """(the fused native Newton step, its arguments) where it serves `objective` on the CPU,
    else None (the extension missing, or the objective declares no "newton_step" kernel)."""
    native = _load_native()[0]
    if native is None or objective.device.type != "cpu":
        return None
    return native.fused_entry(objective)
