"""The dense-matrix memory budget: what an n x n matrix costs, and the refusal past the budget.

Kept below every other engine module so options (the default budget) and each backend's
assembly (the check) share one arithmetic.
"""

from __future__ import annotations

import torch

from .errors import ResourceLimitError

DEFAULT_DENSE_BUDGET_BYTES = 2 * 1024**3


def dense_hessian_bytes(n: int, dtype: torch.dtype = torch.float64) -> int:
    """Bytes of one dense n x n matrix of `dtype`."""
    return n * n * dtype.itemsize


def format_bytes(nbytes: int) -> str:
    """A size for a message: MiB to a tenth, bytes below a tenth of a MiB (never "0.0 MiB")."""
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 / 10 else f"{nbytes} bytes"


def check_dense_budget(
    n: int, budget_bytes: int | None, dtype: torch.dtype = torch.float64, field: str = "params"
) -> None:
    """Refuse, before allocating, a dense Hessian larger than `budget_bytes` (None: no limit)."""
    need = dense_hessian_bytes(n, dtype)
    if budget_bytes is not None and need > budget_bytes:
        raise ResourceLimitError(
            field,
            f"a dense Hessian of {n} parameters needs {format_bytes(need)} "
            f"({n}x{n} {str(dtype).removeprefix('torch.')}), over the dense-Hessian memory "
            f"budget of {format_bytes(budget_bytes)}; use a Hessian-free method or raise the "
            "budget",
        )
