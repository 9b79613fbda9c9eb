"""Seeded draws with torch's generator, so callers without torch get torch's exact numbers.

Tensors are drawn in order from one CPU torch.Generator seeded once, exactly as the seed
notebook's torch.manual_seed(0); torch.rand(...); torch.rand(...) does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ResourceLimitError, UnknownNameError, ValidationError
from ..objectives.base import Objective

DISTRIBUTIONS = ("uniform", "normal")
SAMPLE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (0 <= seed < 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValidationError("seed", "an integer in [0, 2**64)", repr(seed))
    return torch.Generator().manual_seed(seed)


def sample(
    seed: int,
    specs: Sequence[tuple[Sequence[int], str, str]],
    *,
    max_elements: int | None = None,
) -> list[torch.Tensor]:
    """Draw each (shape, dtype name, distribution) in order from one generator."""
    gen = generator(seed)
    out = []
    total = 0
    for i, (shape, dtype_name, distribution) in enumerate(specs):
        field = f"tensors[{i}]"
        if any(s < 0 for s in shape):
            raise ValidationError(f"{field}.shape", "non-negative sizes", list(shape))
        numel = 1
        for s in shape:
            numel *= s
        total += numel
        if max_elements is not None and total > max_elements:
            raise ResourceLimitError(
                f"{field}.shape", f"{total} values requested, over the limit of {max_elements}"
            )
        if dtype_name not in SAMPLE_DTYPES:
            raise UnknownNameError(f"{field}.dtype", dtype_name, list(SAMPLE_DTYPES))
        dtype = SAMPLE_DTYPES[dtype_name]
        if distribution == "uniform":
            out.append(torch.rand(tuple(shape), generator=gen, dtype=dtype))
        elif distribution == "normal":
            out.append(torch.randn(tuple(shape), generator=gen, dtype=dtype))
        else:
            raise UnknownNameError(f"{field}.distribution", distribution, list(DISTRIBUTIONS))
    return out


def initial_params(objective: Objective, seed: int, distribution: str) -> torch.Tensor:
    """A run's starting point drawn on the server: the objective's default or a plain draw."""
    gen = generator(seed)
    if distribution == "objective_default":
        return objective.init_params(gen)
    dtype = objective.compute_dtype()
    if distribution == "uniform":
        return torch.rand(objective.num_params, generator=gen, dtype=dtype)
    if distribution == "normal":
        return torch.randn(objective.num_params, generator=gen, dtype=dtype)
    raise UnknownNameError("init.distribution", distribution, [*DISTRIBUTIONS, "objective_default"])
