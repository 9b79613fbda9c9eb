"""The autograd curvature path: loss, gradient, dense Hessian, Hessian-vector and GGN products.

This is the fallback for everything the native extension does not cover. The dense Hessian
recipe is chosen by size and memory: one batched double-backward (all n rows at once) for
small n, chunks of rows for larger n so the batched graph never exceeds a memory budget,
and never a recipe that costs more than the plain row loop.

No product here uses forward-mode AD (torch.func.jvp, jacfwd, torch.func.hessian): torch
keeps the forward-AD dual level in process-global state (torch.autograd.forward_ad's
_current_level, functorch's JVP_NESTING and the C++ level registry), so two requests
computing jvps at once corrupt each other's tangents or fail. Jacobian-vector products are
reverse passes instead: H v is a vjp of the gradient (H is symmetric) and J v a vjp of the
linear map u -> J^T u (`jacobian_product`); torch.func's grad/vjp/vmap keep their state
per thread.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import cancel
from ..budget import DEFAULT_DENSE_BUDGET_BYTES, check_dense_budget
from ..objectives.base import Objective

DEFAULT_BATCH_BUDGET_BYTES = 64 * 1024**2

Product = Callable[[torch.Tensor], torch.Tensor]


def loss_value(objective: Objective, params: torch.Tensor) -> torch.Tensor:
    """The loss alone, without building a graph."""
    with torch.no_grad():
        return objective.loss(params)


def loss_and_grad(objective: Objective, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient at `params` (both detached)."""
    if not torch.is_grad_enabled():  # entering enable_grad costs a microsecond a call
        with torch.enable_grad():
            return loss_and_grad(objective, params)
    x = params.detach().requires_grad_(True)
    loss = objective.loss(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def rows_per_chunk(n: int, batch_budget_bytes: int, graph_bytes: int, itemsize: int) -> int:
    """How many Hessian rows one batched double-backward may compute within the budget.

    Each batched row replays the backward graph, so its memory scales with the tensors
    the graph saved (`graph_bytes`, measured while building it); measured on the mlp, a
    row costs about half of that, so budgeting one full graph per row keeps the peak
    under the budget with a 2x margin. Never less than 16 n-vectors per row.
    """
    per_row = max(graph_bytes, 16 * n * itemsize, 1)
    return max(1, min(n, batch_budget_bytes // per_row))


def newton_system(
    objective: Objective,
    params: torch.Tensor,
    *,
    budget_bytes: int | None = DEFAULT_DENSE_BUDGET_BYTES,
    batch_budget_bytes: int = DEFAULT_BATCH_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, gradient and dense Hessian at `params`, from one forward and double-backward passes."""
    n = params.numel()
    check_dense_budget(n, budget_bytes, params.dtype)
    x = params.detach().requires_grad_(True)
    graph_bytes = 0

    def count(t: torch.Tensor) -> torch.Tensor:
        nonlocal graph_bytes
        graph_bytes += t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        loss = objective.loss(x)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    if not grad.requires_grad:
        # The gradient does not depend on x (a linear objective): the Hessian is zero.
        return loss.detach(), grad.detach(), params.new_zeros((n, n))
    chunk = rows_per_chunk(n, batch_budget_bytes, graph_bytes, params.element_size())
    eye = torch.eye(n, dtype=params.dtype, device=params.device)
    hessian = params.new_empty((n, n))
    for start in range(0, n, chunk):
        cancel.check(f"after {start} of {n} Hessian rows")
        stop = min(n, start + chunk)
        last = stop == n
        if stop - start == 1:
            (row,) = torch.autograd.grad(
                grad, x, eye[start], retain_graph=not last, allow_unused=True
            )
            hessian[start] = 0 if row is None else row
            continue
        (rows,) = torch.autograd.grad(
            grad,
            x,
            eye[start:stop],
            retain_graph=not last,
            is_grads_batched=True,
            allow_unused=True,
        )
        hessian[start:stop] = 0 if rows is None else rows
    return loss.detach(), grad.detach(), hessian


def hessian(
    objective: Objective,
    params: torch.Tensor,
    *,
    budget_bytes: int | None = DEFAULT_DENSE_BUDGET_BYTES,
    batch_budget_bytes: int = DEFAULT_BATCH_BUDGET_BYTES,
) -> torch.Tensor:
    """The dense Hessian at `params` (see `newton_system` for the recipe)."""
    return newton_system(
        objective, params, budget_bytes=budget_bytes, batch_budget_bytes=batch_budget_bytes
    )[2]


def gradient_product(grad_fn: Product, x: torch.Tensor) -> Product:
    """v -> H v for grad_fn = torch.func.grad(f), H the (symmetric) Hessian of f at x.

    A torch.func vjp of the gradient, recomputed per call: nothing is kept between products
    and the product is vmap-able.
    """

    def product(v: torch.Tensor) -> torch.Tensor:
        return torch.func.vjp(grad_fn, x)[1](v)[0]

    return product


def jacobian_product(fn: Product, x: torch.Tensor) -> tuple[torch.Tensor, Product, Product]:
    """fn(x), v -> J v and u -> J^T u for J the Jacobian of fn at x, by reverse passes only.

    J v is the vjp of the linear map u -> J^T u (at u = 0) with cotangent v: the
    "double-vjp" trick, whose graphs are built once here; both products are vmap-able.
    """
    out, vjp_fn = torch.func.vjp(fn, x)

    def transposed(u: torch.Tensor) -> torch.Tensor:
        return vjp_fn(u)[0]

    _, double_vjp = torch.func.vjp(transposed, torch.zeros_like(out))

    def forward(v: torch.Tensor) -> torch.Tensor:
        return double_vjp(v)[0]

    return out, forward, transposed


def hvp(objective: Objective, params: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Hessian-vector product H(params) @ vector, reverse-over-reverse (no dense Hessian)."""
    grad_fn = torch.func.grad(objective.loss)
    return gradient_product(grad_fn, params.detach())(vector.detach())


def gauss_newton(
    objective: Objective,
    params: torch.Tensor,
    *,
    budget_bytes: int | None = DEFAULT_DENSE_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, gradient and the generalised Gauss-Newton matrix J^T H_out J + H_reg.

    J is the Jacobian of the model outputs, H_out the Hessian of the data term in the
    outputs (block-diagonal per sample), H_reg the regulariser's Hessian. The GGN is
    positive semi-definite for convex output losses, unlike the Hessian of a network.
    """
    objective.require_curvature("gauss_newton")
    n = params.numel()
    check_dense_budget(n, budget_bytes, params.dtype)
    x = params.detach()
    loss, grad = loss_and_grad(objective, x)
    out = objective.outputs(x).detach()
    m = out.numel()
    jac = torch.func.jacrev(objective.outputs)(x).reshape(m, n)
    grad_out = torch.func.grad(lambda o: objective.output_loss(o.reshape(out.shape)))
    cancel.check("after the output Jacobian")
    _, out_hvp = torch.func.vjp(grad_out, out.reshape(-1))
    h_out_jac = torch.func.vmap(lambda v: out_hvp(v)[0], in_dims=1, out_dims=1)(jac)
    ggn = jac.T @ h_out_jac
    ggn = (ggn + ggn.T) / 2
    h_reg = torch.func.jacrev(torch.func.grad(objective.regulariser))(x)
    return loss, grad, ggn + h_reg
