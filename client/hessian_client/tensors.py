"""Tensors on the wire: numpy arrays (or torch tensors, when torch is importable) <-> Tensor."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .errors import invalid
from .proto import tensor_pb2

DTYPES: dict[int, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
}
WIRE_DTYPE = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items()}


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array from an array, a torch tensor (moved to CPU, detached) or nested lists."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def dtype_of(value: Any) -> np.dtype | None:
    """The numpy dtype `value` arrives as (None where it is no array: encode then says what
    it is)."""
    try:
        return as_numpy(value).dtype
    except (TypeError, ValueError):
        return None


def encode(
    value: Any, *, dtype: np.dtype | str | None = None, field: str = "tensor"
) -> tensor_pb2.Tensor:
    """Encode `value` as a Tensor: float32, float64 or int64 (Python floats become float64);
    InvalidArgument naming `field` when it is not a numeric array of one of those."""
    try:
        array = as_numpy(value)
    except (TypeError, ValueError) as exc:  # ragged nested lists, objects numpy cannot take
        torch = sys.modules.get("torch")
        if (
            torch is not None
            and isinstance(value, torch.Tensor)
            and value.layout == torch.strided
            and "ScalarType" in str(exc)
        ):
            # a dtype numpy lacks (bfloat16, float8, complex32): numpy's refusal read "Got
            # unsupported ScalarType BFloat16"
            dtype = str(value.dtype).removeprefix("torch.")
            raise invalid(field, "dtype float32, float64 or int64", dtype) from None
        raise invalid(field, "a numeric array (float32, float64 or int64)", str(exc)) from None
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    elif array.dtype.kind in "iu" and array.dtype != np.int64:
        array = array.astype(np.int64)
    native = array.dtype.newbyteorder("=")
    if native not in WIRE_DTYPE:
        raise invalid(field, "dtype float32, float64 or int64", str(array.dtype))
    wire = WIRE_DTYPE[native]
    data = np.ascontiguousarray(array, dtype=DTYPES[wire]).tobytes()
    return tensor_pb2.Tensor(dtype=wire, shape=list(array.shape), data=data)


def decode(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor into a (writable) numpy array in native byte order."""
    if tensor.dtype not in DTYPES:
        raise ValueError(f"unknown tensor dtype {tensor.dtype}")
    dt = DTYPES[tensor.dtype]
    shape = tuple(tensor.shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(tensor.data) != numel * dt.itemsize:
        raise ValueError(
            f"tensor data has {len(tensor.data)} bytes, shape {list(shape)} needs "
            f"{numel * dt.itemsize}"
        )
    return (
        np.frombuffer(tensor.data, dtype=dt).astype(dt.newbyteorder("="), copy=True).reshape(shape)
    )


def like_input(array: np.ndarray, original: Any) -> Any:
    """Return `array` as a torch tensor when `original` was one, else as numpy."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(original, torch.Tensor):
        return torch.from_numpy(array).to(original.device)
    return array
