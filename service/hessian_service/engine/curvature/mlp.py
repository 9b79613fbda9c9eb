"""Closed-form loss, gradient and dense Hessian (or Gauss-Newton matrix) of the `mlp` objective.

Autograd builds a dense Hessian from n Hessian-vector products, each a pass over the data;
here the whole matrix comes from one forward and one backward pass plus a few GEMMs whose
cost is about N n^2 multiply-adds. Per sample, with z_l = W_l a_l + b_l, a_{l+1} = s(z_l),
D_l = diag(s'(z_l)), delta_l = dLoss/dz_l and abar_l = [a_l; 1]:

* M_l, the Hessian of the loss in z_l (Dangel et al.'s Hessian backpropagation):
  M_L = H_out, M_l = D_l W_{l+1}^T M_{l+1} W_{l+1} D_l + diag(s''(z_l) (W_{l+1}^T delta_{l+1})).
* G_{l,m} = dz_l/dz_m = W_l D_{l-1} G_{l-1,m}, G_{m,m} = I.
* The block of layers l >= m, entries [(p, q), (j, k)] over [W_l | b_l] and [W_m | b_m]:
  (M_l G_{l,m})[p, j] abar_l[q] abar_m[k] + delta_l[p] (D_{l-1} G_{l-1,m})[q, j] abar_m[k]
  (the second term only for l > m and q a weight column).

Each block summed over samples is one GEMM over the sample axis (Kronecker pairs), permuted
into the flat layout. Dropping the s'' term and the second term gives the Gauss-Newton
matrix J^T H_out J. Samples are processed in chunks so per-sample matrices stay in a budget.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..objectives import losses
from ..objectives.base import Objective

DEFAULT_CHUNK_BYTES = 64 * 1024**2


def _activation(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s(z), s'(z), s''(z)) for the objective's activation (torch's conventions at kinks)."""
    if name == "tanh":
        t = torch.tanh(z)
        d1 = 1 - t * t
        return t, d1, -2 * t * d1
    if name == "relu":
        return torch.relu(z), (z > 0).to(z.dtype), torch.zeros_like(z)
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return z * cdf, cdf + z * pdf, pdf * (2 - z * z)
    raise ValueError(f"unknown activation {name!r}")


def _augment(a: torch.Tensor) -> torch.Tensor:
    """[a, 1]: the layer input with the bias column appended."""
    return torch.cat([a, a.new_ones((a.shape[0], 1))], dim=1)


def _output_terms(
    objective: Objective, f: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample data loss, its gradient and Hessian in the outputs (before the 1/N mean)."""
    out = f.shape[1]
    if objective.options["loss"] == "mse":
        r = f - y
        eye = torch.eye(out, dtype=f.dtype, device=f.device)
        return (r * r).sum(1) / out, r * (2.0 / out), (2.0 / out) * eye.expand(f.shape[0], -1, -1)
    p, hess = losses.softmax_curvature(f)
    return losses.cross_entropy_rows(f, y), losses.cross_entropy_residual(p, y), hess


def _per_sample_bytes(sizes: list[int], itemsize: int) -> int:
    """Bytes of the per-sample matrices one chunk row holds (M, G, Kronecker operands)."""
    outs, ins = sizes[1:], [s + 1 for s in sizes[:-1]]
    total = sum(o * o for o in outs)
    for li in range(len(outs)):
        for mi in range(li + 1):
            total += 2 * outs[li] * outs[mi] + ins[li] * ins[mi] + outs[li] * ins[mi]
    return total * itemsize


def mlp_newton_system(
    objective: Objective,
    params: torch.Tensor,
    kind: str = "hessian",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, gradient and the dense Hessian (kind "hessian") or GGN ("gauss_newton") of an mlp."""
    x_all, y_all = objective.data["X"], objective.data["y"]
    l2 = objective.options["l2"]
    exact = kind == "hessian"
    theta = params.detach()
    layers = [_Layer(*spec) for spec in objective._layers]
    weights = [theta[ly.w0 : ly.b0].reshape(ly.fan_out, ly.fan_in) for ly in layers]
    biases = [theta[ly.b0 : ly.end] for ly in layers]
    last = len(layers) - 1
    n, rows = theta.numel(), x_all.shape[0]
    hess = theta.new_zeros((n, n))
    grad = l2 * theta
    loss_sum = theta.new_zeros(())
    per_row = _per_sample_bytes(objective.options["layer_sizes"], theta.element_size())
    chunk = max(1, min(rows, chunk_bytes // max(1, per_row)))
    for r0 in range(0, rows, chunk):
        x, y = x_all[r0 : r0 + chunk], y_all[r0 : r0 + chunk]
        abar, d1, d2 = [], [], []
        a = x
        for li in range(last + 1):
            abar.append(_augment(a))
            a = torch.addmm(biases[li], a, weights[li].T)
            if li < last:
                a, s1, s2 = _activation(objective.options["activation"], a)
                d1.append(s1)
                d2.append(s2)
        sample_loss, delta_out, m_out = _output_terms(objective, a, y)
        loss_sum += sample_loss.sum()
        # The 1/N of the mean folds into the output terms: everything below is linear in them.
        deltas = [delta_out / rows] * (last + 1)
        curv = [m_out / rows] * (last + 1)
        for li in range(last - 1, -1, -1):
            back = deltas[li + 1] @ weights[li + 1]
            deltas[li] = back * d1[li]
            wmw = weights[li + 1].T @ curv[li + 1] @ weights[li + 1]
            curv[li] = d1[li].unsqueeze(2) * wmw * d1[li].unsqueeze(1)
            if exact:
                curv[li] = curv[li] + torch.diag_embed(d2[li] * back)
        for li, ly in enumerate(layers):
            g = deltas[li].T @ abar[li]
            grad[ly.w0 : ly.b0] += g[:, :-1].reshape(-1)
            grad[ly.b0 : ly.end] += g[:, -1]
        for mi in range(last + 1):
            jac = None  # G_{l,m} = dz_l/dz_m, built outward from layer m
            for li in range(mi, last + 1):
                if li == mi:
                    inner, left = None, curv[li]
                else:
                    # D_{l-1} G_{l-1,m}: layer l's input as a function of z_m
                    inner = d1[li - 1].unsqueeze(2) * (
                        torch.eye(layers[mi].fan_out, dtype=theta.dtype, device=theta.device)
                        if jac is None
                        else jac
                    )
                    jac = weights[li] @ inner
                    left = curv[li] @ jac
                _add_kron_term(hess, layers[li], layers[mi], left, abar[li], abar[mi])
                if exact and inner is not None:
                    _add_cross_term(hess, layers[li], layers[mi], deltas[li], inner, abar[mi])
    _mirror_lower_blocks(hess, layers)
    hess.diagonal().add_(l2)
    penalty = 0.5 * l2 * torch.dot(theta, theta) if l2 != 0 else 0.0  # never 0 x inf
    loss = loss_sum / rows + penalty
    return loss, grad, hess


class _Layer(NamedTuple):
    """Where one layer's [W | b] sits in the flat parameter vector."""

    w0: int
    fan_out: int
    fan_in: int
    b0: int

    @property
    def end(self) -> int:
        return self.b0 + self.fan_out


def _add_block(hess: torch.Tensor, row: _Layer, col: _Layer, block: torch.Tensor) -> None:
    """Add `block` [(p, q), (j, k)] over augmented [W | b] indices into the flat-layout H.

    q runs over the row layer's weight columns and its bias, or over the weight columns only
    (a block with fan_in entries on that axis leaves the bias rows alone).
    """
    fr, fc = row.fan_in, col.fan_in
    rw, rb = slice(row.w0, row.b0), slice(row.b0, row.end)
    cw, cb = slice(col.w0, col.b0), slice(col.b0, col.end)
    hess[rw, cw].view(row.fan_out, fr, col.fan_out, fc).add_(block[:, :fr, :, :fc])
    hess[rw, cb].view(row.fan_out, fr, col.fan_out).add_(block[:, :fr, :, fc])
    if block.shape[1] > fr:
        hess[rb, cw].view(row.fan_out, col.fan_out, fc).add_(block[:, fr, :, :fc])
        hess[rb, cb].add_(block[:, fr, :, fc])


def _add_kron_term(
    hess: torch.Tensor,
    row: _Layer,
    col: _Layer,
    left: torch.Tensor,
    abar_l: torch.Tensor,
    abar_m: torch.Tensor,
) -> None:
    """Add sum_i left_i[p, j] abar_l[q] abar_m[k] at [(p, q), (j, k)]: one GEMM over samples."""
    c = left.shape[0]
    kron = (abar_l.unsqueeze(2) * abar_m.unsqueeze(1)).reshape(c, -1)
    prod = left.reshape(c, -1).T @ kron  # [(p, j), (q, k)]
    prod = prod.reshape(row.fan_out, col.fan_out, row.fan_in + 1, col.fan_in + 1)
    _add_block(hess, row, col, prod.permute(0, 2, 1, 3))


def _add_cross_term(
    hess: torch.Tensor,
    row: _Layer,
    col: _Layer,
    delta_l: torch.Tensor,
    inner: torch.Tensor,
    abar_m: torch.Tensor,
) -> None:
    """Add sum_i delta_l[p] inner_i[q, j] abar_m[k] at [(p, q), (j, k)] (q a weight column)."""
    c = delta_l.shape[0]
    outer = (delta_l.unsqueeze(2) * abar_m.unsqueeze(1)).reshape(c, -1)  # [(p, k)]
    prod = outer.T @ inner.reshape(c, -1)  # [(p, k), (q, j)]
    prod = prod.reshape(row.fan_out, col.fan_in + 1, row.fan_in, col.fan_out)
    _add_block(hess, row, col, prod.permute(0, 2, 3, 1))


def _mirror_lower_blocks(hess: torch.Tensor, layers: list[_Layer]) -> None:
    """Copy each layer block below the diagonal onto its transposed place above it."""
    for li, row in enumerate(layers):
        for col in layers[:li]:
            hess[col.w0 : col.end, row.w0 : row.end] = hess[row.w0 : row.end, col.w0 : col.end].T
