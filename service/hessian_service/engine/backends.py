"""Curvature backends behind one interface, and the auto/native/autograd selection.

`autograd` (pure Python, torch autograd) always works. `native` is the compiled extension
`hessian_service._C`, loaded through `native_backend`; when it fails to import, the real
exception is logged once and kept for `native_status()`. `closed_form` assembles the mlp's
Hessian and Gauss-Newton matrix from explicit formulas (`mlp_curvature`, torch ops, no
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

from . import curvature, linalg, mlp_curvature
from .errors import UnavailableError
from .objectives.base import Objective

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
        curvature.check_dense_budget(params.numel(), budget_bytes, params.dtype)
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
        from .native_backend import NativeBackend
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
