"""The native block products: V -> B V from csrc/products.cpp, built from each objective's
declaration.

B is the Hessian or Gauss-Newton matrix at `params`, V an (n, k) block (k = 1: one
product). An objective that declares the "block_product" kernel (`native_kernels`) names
its product op (`native_product_op`, default hessian::<name>_block_product) and the
per-point inputs that op takes (`native_product_inputs`: argument -> op, e.g. logistic
weights p (1 - p), softmax probabilities), each computed once when the product is built, so
each product is a couple of matrix products. Every op's arguments are bound by their schema
names: `x` the point, `V` the block, the objective's data fields (on the requested rows) and
options, the per-point inputs; an optional argument nothing supplies is None. So a new
objective with native products needs no edit here. Whether a product serves a call is
chosen by `selector.resolve`, with the dense system and the solve.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ...curvature.products import BlockProduct
from ...objectives.base import Objective

# An argument's source: ("x" | "V" | "data" | "option" | "input" | "none", name)
_Source = tuple[str, str]
# One op of a product: (output name or None for the product op, op, argument sources)
_Step = tuple[str | None, Callable[..., Any], tuple[_Source, ...]]


def block_product_ops(cls: type[Objective]) -> tuple[str, ...]:
    """The hessian:: ops `cls`'s block product calls: its per-point inputs' ops, then the
    product op (whether or not `cls` declares the "block_product" kernel)."""
    product = cls.native_product_op or f"{cls.name}_block_product"
    return (*(op for _, op in cls.native_product_inputs), product)


@functools.cache
def _plan(cls: type[Objective]) -> tuple[_Step, ...]:
    """The ops of `cls`'s declared block product with each argument's source; a declaration
    the extension cannot serve is refused here, naming the capability, op and argument."""
    from .ops import declared_op  # here: loading ops loads _C, which the selector may lack

    known = {"x": "x"}
    known.update({name: "data" for name in cls.data_fields})
    known.update({name: "option" for name in cls.option_names})
    steps: list[_Step] = []
    outputs = [*(argument for argument, _ in cls.native_product_inputs), None]
    for output, name in zip(outputs, block_product_ops(cls), strict=True):
        op = declared_op(cls, "block_product", name)
        available = known if output is not None else {**known, "V": "V"}
        sources = []
        for argument in op.default._schema.arguments:
            kind = available.get(argument.name)
            if kind is None and isinstance(argument.type, torch._C.OptionalType):
                kind = "none"
            if kind is None:
                raise TypeError(
                    f"{cls.__name__} declares the native kernel 'block_product' but "
                    f"hessian::{name} takes {argument.name!r}, which none of x, its "
                    "data fields, its options, its native_product_inputs (or V, for the "
                    "product op) supplies"
                )
            sources.append((kind, argument.name))
        if output is None and ("V", "V") not in sources:
            raise TypeError(
                f"{cls.__name__} declares the native kernel 'block_product' but its product "
                f"op hessian::{name} takes no block argument 'V'"
            )
        steps.append((output, op, tuple(sources)))
        if output is not None:
            known[output] = "input"
    return tuple(steps)


def native_block_product(
    objective: Objective, x: torch.Tensor, rows: torch.Tensor | None
) -> BlockProduct:
    """V -> B V at the flat point `x` (on data rows `rows`, None: all) from the native ops
    `objective` declares."""
    values: dict[str, Any] = {"x": x}
    product: BlockProduct | None = None
    for output, op, sources in _plan(type(objective)):
        args: list[Any] = []
        slot = -1
        for kind, name in sources:
            if kind == "V":
                slot = len(args)
                args.append(None)
            elif kind == "data":
                t = objective.data[name]
                if rows is not None and name in objective.row_fields:
                    t = t.index_select(0, rows.to(t.device))
                args.append(t)
            elif kind == "option":
                args.append(objective.options[name])
            elif kind == "none":
                args.append(None)
            else:
                args.append(values[name])
        if output is not None:
            values[output] = op(*args)
        else:
            product = _bound(op, tuple(args[:slot]), tuple(args[slot + 1 :]))
    assert product is not None  # the last step is the product op (block_product_ops)
    return product


def _bound(op: Callable[..., Any], before: tuple, after: tuple) -> BlockProduct:
    """V -> op(*before, V, *after)."""
    return lambda v: op(*before, v, *after)
