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
from dataclasses import dataclass
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

    def saddle_free(self, h: torch.Tensor, g: torch.Tensor, floor: float) -> linalg.SolveResult:
        """Saddle-free Newton direction with the negative-eigenvalue count."""


class AutogradBackend:
    """The pure-Python path: torch autograd assembly and ATen/LAPACK solves."""

    name = "autograd"

    def supports_system(self, objective: Objective, params: torch.Tensor, kind: str) -> bool:
        return kind == "hessian" or objective.supports_ggn

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

    def saddle_free(self, h: torch.Tensor, g: torch.Tensor, floor: float) -> linalg.SolveResult:
        return linalg.saddle_free_direction(h, g, floor)


AUTOGRAD = AutogradBackend()


class ClosedFormBackend(AutogradBackend):
    """Closed-form mlp assembly (one forward/backward pass and GEMMs); ATen/LAPACK solves."""

    name = "closed_form"

    def supports_system(self, objective: Objective, params: torch.Tensor, kind: str) -> bool:
        return objective.name == "mlp" and params.dtype in (torch.float32, torch.float64)

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
    """Who assembles the curvature and who solves; `label` goes into every step record."""

    system: Backend
    solver: Backend

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
    requested: str, objective: Objective, params: torch.Tensor, kind: str
) -> ResolvedBackend:
    """Pick the backends for one call: `requested` is auto, native or autograd."""
    if requested == "autograd":
        return ResolvedBackend(AUTOGRAD, AUTOGRAD)
    native = native_for(requested, params)
    return ResolvedBackend(_assembler(native, objective, params, kind), native or AUTOGRAD)


def select_backend(
    objective: Objective, params: torch.Tensor, backend: str, kind: str = "hessian"
) -> str:
    """'native' or 'autograd': who serves `kind` products here under the requested backend."""
    if backend not in BACKENDS:
        raise UnknownNameError("backend", backend, list(BACKENDS))
    if native_for(backend, params) is None:
        return "autograd"
    covered = objective.name in products.NATIVE_PRODUCTS and (
        kind == "hessian" or objective.supports_ggn
    )
    return "native" if covered else "autograd"


def native_block_product(
    objective: Objective,
    params: torch.Tensor,
    backend: str,
    kind: str = "hessian",
    rows: torch.Tensor | None = None,
) -> BlockProduct | None:
    """The native V -> B V at `params` (on data rows `rows`), or None where autograd serves."""
    if select_backend(objective, params, backend, kind) != "native":
        return None
    if rows is not None and not objective.row_fields:
        raise ValidationError("rows", f"None for {objective.name}, which has no data rows")
    x = params.detach().reshape(-1).to(dtype=objective.compute_dtype(params))
    return products.NATIVE_PRODUCTS[objective.name](objective, x, rows)


def curvature_product(
    objective: Objective,
    params: torch.Tensor,
    kind: str = "hessian",
    hvp_mode: str = "forward_over_reverse",
    backend: str = "autograd",
) -> Product:
    """The curvature-vector product of `kind` (hessian | gauss_newton) at `params`.

    backend auto/native: the closed-form native product where native/products.py covers the
    objective (on the same rows), else the autograd product.
    """
    sub = objective
    if hasattr(sub, "product_at"):  # evaluated elsewhere (asktell.RemoteObjective asks)
        return sub.product_at(params, kind)
    native = native_block_product(sub, params, backend, kind)
    if native is not None:
        return as_vector_product(native)
    if kind == "gauss_newton":
        return ggn_product(sub, params)
    return hessian_product(sub, params, hvp_mode)


def curvature_block_product(
    objective: Objective,
    params: torch.Tensor,
    backend: str = "auto",
    rows: torch.Tensor | None = None,
    *,
    kind: str = "hessian",
    hvp_mode: str = "forward_over_reverse",
) -> tuple[BlockProduct, str]:
    """(V (n, k) -> B V, backend label) at `params`, on data rows `rows` (None: all rows).

    kind is hessian or gauss_newton; hvp_mode picks the autograd Hessian product (unused
    by native products, which are exact closed forms).
    """
    native = native_block_product(objective, params, backend, kind, rows)
    if native is not None:
        return native, "native"
    return autograd_block_product(objective, params, kind, rows, hvp_mode), "autograd"
