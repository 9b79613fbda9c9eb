"""Loads the compiled extension `hessian_service._C` and registers its fake (meta) kernels.

Importing this module raises whatever the import of `_C` raises (missing build, ABI
mismatch), so the backend selection can log the real reason. The ops live under
`torch.ops.hessian`; the fake kernels below give their output shapes and dtypes for
torch.compile, FakeTensor and `torch.library.opcheck`: ops whose names share a suffix
(`*_system`, `*_newton_step`, `*_block_product`) get theirs from one rule (FAKE_RULES), the
others one written here each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .... import _C  # (loading the library registers torch.ops.hessian.*)

ops = torch.ops.hessian


def declared_op(cls: type, capability: str, name: str, direct: bool = False) -> Any:
    """The op `name` (hessian::name, or with `direct` the direct entry _C.name) that class
    `cls` declares through its native kernel `capability`; refused, naming both, where the
    extension has no such op."""
    found = getattr(_C, name, None) if direct else getattr(ops, name, None)
    if found is None:
        where = f"_C.{name}" if direct else f"hessian::{name}"
        raise TypeError(
            f"{cls.__name__} declares the native kernel {capability!r} but the extension has "
            f"no {where}"
        )
    return found


def _system_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    return x.new_empty(()), x.new_empty((n,)), x.new_empty((n, n))


# loss, |g|, max|g|, step norm, damping, attempts, finite, slope (csrc/fused_steps.h)
FUSED_STATS = 8


def _step_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((x.numel(),)), torch.empty(FUSED_STATS, dtype=torch.float64)


def _block_product_fake(v: torch.Tensor) -> torch.Tensor:
    return v.new_empty(v.shape)


# Ops whose names end alike share an output rule: name suffix -> (the schema argument the
# rule reads, the rule). Each such op gets its fake kernel from here, so a new op that
# follows a rule needs none written by hand.
FAKE_RULES: dict[str, tuple[str, Callable[[torch.Tensor], Any]]] = {
    "_system": ("x", _system_fake),
    "_newton_step": ("x", _step_fake),
    "_block_product": ("V", _block_product_fake),
}


def fake_from_rule(name: str, argument: str, rule: Callable[[torch.Tensor], Any]) -> Callable:
    """The fake kernel of hessian::`name`: `rule` applied to its argument `argument`, found
    by the op's schema; an op without that argument is refused, naming both."""
    names = [a.name for a in getattr(ops, name).default._schema.arguments]
    if argument not in names:
        raise TypeError(
            f"hessian::{name} takes no argument {argument!r}, which the fake-kernel rule for "
            f"its name reads: give it a fake kernel of its own in ops.py"
        )
    index = names.index(argument)

    def fake(*args: Any, **kwargs: Any) -> Any:
        return rule(kwargs[argument] if argument in kwargs else args[index])

    return fake


def _register_rule_fakes() -> None:
    """Register the fake kernel of every hessian:: op whose name matches a FAKE_RULES suffix."""
    for qualname in torch._C._dispatch_get_all_op_names():
        namespace, _, name = qualname.partition("::")
        if namespace != "hessian":
            continue
        for suffix, (argument, rule) in FAKE_RULES.items():
            if name.endswith(suffix):
                torch.library.register_fake(qualname, fake_from_rule(name, argument, rule))


_register_rule_fakes()


@torch.library.register_fake("hessian::damped_cholesky")
def _(h, g, damping, max_attempts):
    return (
        g.new_empty(g.shape),
        h.new_empty((), dtype=torch.float64),
        h.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("hessian::saddle_free")
def _(h, g, eigenvalue_floor, tolerance_factor):
    return g.new_empty(g.shape), h.new_empty((), dtype=torch.int64)


@torch.library.register_fake("hessian::gauss_newton")
def _(jac, weights=None):
    n = jac.shape[1]
    return jac.new_empty((n, n))


# ---------------------------------------------------------------- block products' per-point inputs


@torch.library.register_fake("hessian::logistic_regression_weights")
def _(x, X, fit_intercept):
    return X.new_empty((X.shape[0],))


@torch.library.register_fake("hessian::softmax_regression_probs")
def _(x, X, num_classes, fit_intercept):
    return X.new_empty((X.shape[0], num_classes))
