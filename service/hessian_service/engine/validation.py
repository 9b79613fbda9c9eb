"""Checks shared by objectives and methods; each failure names the field it concerns."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from .errors import ValidationError

FLOAT_DTYPES = (torch.float32, torch.float64)


def require_tensor(
    data: Mapping[str, Any],
    name: str,
    *,
    ndim: int | None = None,
    kind: str = "float",
    field_prefix: str = "data",
) -> torch.Tensor:
    """Return `data[name]` after checking it is a tensor of the right rank, dtype kind and finite.

    kind is "float" (float32/float64) or "int" (int64 labels).
    """
    field = f"{field_prefix}.{name}"
    if name not in data:
        raise ValidationError(field, "a tensor", "nothing")
    t = data[name]
    if not isinstance(t, torch.Tensor):
        raise ValidationError(field, "a torch.Tensor", type(t).__name__)
    if ndim is not None and t.dim() != ndim:
        raise ValidationError(field, f"{ndim} dimensions", f"shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValidationError(field, "a non-empty tensor", f"shape {tuple(t.shape)}")
    if kind == "float":
        if t.dtype not in FLOAT_DTYPES:
            raise ValidationError(field, "dtype float32 or float64", str(t.dtype))
        if not bool(torch.isfinite(t).all()):
            raise ValidationError(field, "finite values", "NaN or inf")
    elif kind == "int":
        if t.dtype != torch.int64:
            raise ValidationError(field, "dtype int64 (integer labels)", str(t.dtype))
    else:
        raise AssertionError(f"unknown tensor kind {kind!r}")
    return t


def require_no_extra(data: Mapping[str, Any], allowed: set[str], field_prefix: str) -> None:
    """Reject names the caller sent that the objective does not use (usually a typo)."""
    extra = sorted(set(data) - allowed)
    if extra:
        raise ValidationError(
            f"{field_prefix}.{extra[0]}",
            f"only {sorted(allowed)}" if allowed else "no fields (it takes none)",
            "an unknown field",
        )


def require_int(field: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """An integer (not a bool) of at least `minimum` (and at most `maximum`, if given)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = (
            f"an integer >= {minimum}"
            if maximum is None
            else f"an integer in [{minimum}, {maximum}]"
        )
        raise ValidationError(field, wanted, repr(value))
    if maximum is not None and value > maximum:
        raise ValidationError(field, f"an integer in [{minimum}, {maximum}]", repr(value))
    return value


def require_same_dtype(field: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """All float data of one problem must share one dtype (it becomes the compute dtype)."""
    if t.dtype != dtype:
        raise ValidationError(field, f"dtype {dtype} like the rest of the data", str(t.dtype))


def option_float(
    options: Mapping[str, Any],
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    field_prefix: str = "options",
) -> float:
    """Read a finite real option, checking its lower bound."""
    field = f"{field_prefix}.{name}"
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(field, "a real number", repr(value))
    value = float(value)
    if not math.isfinite(value):
        raise ValidationError(field, "a finite number", repr(value))
    if minimum is not None:
        if exclusive_minimum and value <= minimum:
            raise ValidationError(field, f"a number > {minimum}", repr(value))
        if not exclusive_minimum and value < minimum:
            raise ValidationError(field, f"a number >= {minimum}", repr(value))
    return value


def option_int(
    options: Mapping[str, Any],
    name: str,
    default: int | None,
    *,
    minimum: int | None = None,
    field_prefix: str = "options",
) -> int | None:
    """Read an integer option (None allowed only as the default)."""
    field = f"{field_prefix}.{name}"
    value = options.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, "an integer", repr(value))
    if minimum is not None and value < minimum:
        raise ValidationError(field, f"an integer >= {minimum}", repr(value))
    return value


def option_bool(
    options: Mapping[str, Any], name: str, default: bool, *, field_prefix: str = "options"
) -> bool:
    """Read a boolean option."""
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise ValidationError(f"{field_prefix}.{name}", "true or false", repr(value))
    return value


def option_choice(
    options: Mapping[str, Any],
    name: str,
    default: str,
    choices: tuple[str, ...],
    *,
    field_prefix: str = "options",
) -> str:
    """Read a string option that must be one of `choices`."""
    value = options.get(name, default)
    if value not in choices:
        raise ValidationError(f"{field_prefix}.{name}", f"one of {list(choices)}", repr(value))
    return value


@contextmanager
def decomposable(field: str) -> Iterator[None]:
    """LAPACK refusing a matrix (entries near float64's range make eigh fail to converge)
    becomes a ValidationError naming `field`, the input that produced the matrix."""
    try:
        yield
    except torch.linalg.LinAlgError as exc:
        reason = str(exc).split(":", 1)[-1].split(".")[0].strip()
        raise ValidationError(
            field, "a point whose curvature matrix float64 can decompose", reason
        ) from None
