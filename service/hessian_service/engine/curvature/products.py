"""Matrix-free autograd curvature products: v -> H v, v -> G v and their (n, k) block forms.

No product forms the n x n matrix; none uses forward-mode AD (see `autograd`). Which product
serves a call (these or the native closed forms) is the selector's choice (`backends.selector`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..objectives.base import Objective
from .autograd import Product, gradient_product, jacobian_product

BlockProduct = Callable[[torch.Tensor], torch.Tensor]


def hessian_product(
    objective: Objective, params: torch.Tensor, mode: str = "forward_over_reverse"
) -> Product:
    """v -> H(params) v without forming H.

    forward_over_reverse (the name kept on the wire): a torch.func vjp of the gradient
    recomputed per product, nothing kept between products (vmap-able); it was a jvp of the
    gradient, which forward-mode AD's process-global level made unsafe under concurrent
    requests, and H v = H^T v makes the vjp the same product. reverse_over_reverse: the
    gradient's graph is built once (create_graph) and each product is one more backward
    through it; per product it skips the forward pass and torch.func's per-call overhead,
    at the cost of holding that graph (O(n + activations)).
    """
    x = params.detach()
    if mode == "reverse_over_reverse":
        leaf = x.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective.loss(leaf), leaf, create_graph=True)
        if not grad.requires_grad:  # a linear loss: H = 0
            return torch.zeros_like

        def backward_product(v: torch.Tensor) -> torch.Tensor:
            (hv,) = torch.autograd.grad(grad, leaf, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv

        return backward_product
    return gradient_product(torch.func.grad(objective.loss), x)


def ggn_product(objective: Objective, params: torch.Tensor) -> Product:
    """v -> (J^T H_out J + H_reg) v for objectives with `supports_ggn`, no Jacobian formed.

    J v is a double vjp and H_out, H_reg products are vjps of gradients (all graphs built
    once per point, `jacobian_product`), so no forward-mode AD runs; vmap-able.
    """
    objective.require_curvature("gauss_newton")
    x = params.detach()
    outputs, jacobian, transposed = jacobian_product(objective.outputs, x)
    _, out_hvp = torch.func.vjp(torch.func.grad(objective.output_loss), outputs.detach())
    reg_hvp = None
    if type(objective).regulariser is not Objective.regulariser:
        _, reg_hvp = torch.func.vjp(torch.func.grad(objective.regulariser), x)

    def product(v: torch.Tensor) -> torch.Tensor:
        result = transposed(out_hvp(jacobian(v))[0])
        if reg_hvp is not None:
            result = result + reg_hvp(v)[0]
        return result

    return product


def autograd_block_product(
    objective: Objective, params: torch.Tensor, kind: str, rows: torch.Tensor | None, mode: str
) -> BlockProduct:
    """V -> B V column by column from the autograd products (vmap'd where they allow it)."""
    sub = objective if rows is None else objective.subsample(rows.to(objective.device))
    if kind == "gauss_newton":
        vector = ggn_product(sub, params)
    else:
        vector = hessian_product(sub, params, mode)
    vmappable = kind == "gauss_newton" or mode == "forward_over_reverse"
    batched = torch.func.vmap(vector, in_dims=1, out_dims=1) if vmappable else None

    def block(v: torch.Tensor) -> torch.Tensor:
        if v.shape[1] == 1:
            return vector(v[:, 0]).unsqueeze(1)
        if batched is not None:
            return batched(v)
        return torch.stack([vector(c) for c in v.unbind(1)], dim=1)

    return block


def as_vector_product(block: BlockProduct) -> Callable[[torch.Tensor], torch.Tensor]:
    """v (n,) -> B v through a block product (k = 1)."""
    return lambda v: block(v.unsqueeze(1)).squeeze(1)
