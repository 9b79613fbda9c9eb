"""Block Lanczos for extreme eigenvalues with their multiplicities, matrix-free.

A single start vector's Krylov space holds one vector of each eigenspace, so plain Lanczos
reports a repeated eigenvalue once. A block of b random start vectors spans b directions of
each eigenspace, so an eigenvalue of multiplicity <= b comes back that many times (Golub &
Underwood 1977; Saad, "Numerical Methods for Large Eigenvalue Problems", ch. 6.2). Each block
step multiplies b vectors at once (one batched product, `BlockProduct`), reorthogonalises the
new block against every previous block twice ("twice is enough"), and orthonormalises it by an
SVD that deflates: directions whose singular value falls below DEFLATION x the spectral scale
are dropped, so the block shrinks where the Krylov space has become invariant and the
projected matrix stays block tridiagonal and exact. The Krylov dimension (= curvature-vector
products) never exceeds `max_dimension`; the last block is cut to fit.
"""

from __future__ import annotations

import torch

from .. import cancel
from ..curvature.products import BlockProduct

DEFLATION = 1e-12  # relative singular value below which a block direction is dropped
CHECK_EVERY = 5  # Krylov dimensions between convergence checks, at least
CHECK_FRACTION = 8  # and at most 1/8 of the dimension so far (a logarithmic number of checks)


def _orthonormal_block(
    w: torch.Tensor, basis: torch.Tensor, cutoff: float, room: int
) -> torch.Tensor:
    """Orthonormal columns spanning w's directions above `cutoff`, orthogonal to `basis` rows.

    At most `room` columns; (n, 0) when w has no direction above the cutoff (deflation).
    """
    q, r = torch.linalg.qr(w)  # then an SVD of the small R: w's singular values, cheaply
    u, s, _ = torch.linalg.svd(r, full_matrices=False)  # never a (b, b) V of a wide w
    keep = min(int((s > cutoff).sum()), room)
    q = q @ u[:, :keep]
    if keep and basis.shape[0]:
        q = q - basis.T @ (basis @ q)  # the SVD divides by s: restore orthogonality to the basis
        q = torch.linalg.qr(q).Q
    return q


def _ritz(
    diagonal: list[torch.Tensor], lower: list[torch.Tensor], last: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (ascending) of the block tridiagonal T and their residual norms ||R s_i||.

    diagonal[j] = Q_j^T B Q_j, lower[j] = Q_{j+1}^T B Q_j, `last` is the Gram matrix R^T R of
    the remainder R of the last block (B Q_m minus its part in the basis).
    """
    sizes = [d.shape[0] for d in diagonal]
    m = sum(sizes)
    t = torch.zeros((m, m), dtype=torch.float64)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    for j, d in enumerate(diagonal):
        a, b = offsets[j], offsets[j + 1]
        t[a:b, a:b] = d
        if j < len(lower):
            c = offsets[j + 2]
            t[b:c, a:b] = lower[j]
            t[a:b, b:c] = lower[j].T
    theta, vecs = torch.linalg.eigh(t)
    tail = vecs[offsets[-2] :]  # the last block's rows of each eigenvector
    residuals = ((tail * (last @ tail)).sum(dim=0)).clamp_min(0.0).sqrt()
    return theta, residuals


def block_lanczos_extremes(
    product: BlockProduct,
    start: torch.Tensor,
    top_k: int,
    bottom_k: int,
    max_dimension: int,
    tolerance: float,
) -> tuple[list[float], list[float], list[float], int, int, bool]:
    """Top-k (descending) and bottom-k (ascending) Ritz values by block Lanczos.

    `start` is the (n, b) start block. Returns (top, bottom, residual bounds, block steps,
    products, converged). Iterates until every wanted Ritz value's residual ||R s_i|| <=
    tolerance x max|theta|, the Krylov space is invariant (every direction deflated: the
    Ritz values are exact), or the Krylov dimension reaches max_dimension (capped at n).
    """
    n = start.shape[0]
    dtype = start.dtype
    m_max = min(max_dimension, n)
    eps_floor = 10 * torch.finfo(dtype).eps
    scale = float(start.norm()) or 1.0
    q = _orthonormal_block(start, start.new_zeros((0, n)), DEFLATION * scale, m_max)
    if q.shape[1] == 0:
        raise ValueError("the start block of block Lanczos is zero")
    basis_rows = start.new_zeros((m_max, n))  # Q_0, Q_1, ... as rows, filled as they come
    offsets = [0]  # block j is basis_rows[offsets[j] : offsets[j + 1]]
    diagonal: list[torch.Tensor] = []
    lower: list[torch.Tensor] = []
    theta = torch.zeros(0, dtype=torch.float64)
    residuals = theta
    converged = False
    products = 0
    next_check = max(CHECK_EVERY, top_k + bottom_k)
    spectral = 0.0
    while True:
        cancel.check(f"in block Lanczos after {products} products")
        w = product(q)
        products += q.shape[1]
        a = q.T @ w
        a = (a + a.T) / 2
        basis_rows[products - q.shape[1] : products] = q.T
        offsets.append(products)
        diagonal.append(a.double().cpu())
        basis = basis_rows[:products]
        w = w - q @ a
        if lower:
            previous = basis_rows[offsets[-3] : offsets[-2]]
            w = w - previous.T @ lower[-1].T.to(w)
        for _ in range(2):  # full reorthogonalisation against every block
            w = w - basis.T @ (basis @ w)
        spectral = max(spectral, float(torch.linalg.matrix_norm(a, 2)), float(w.norm()))
        cutoff = max(DEFLATION, eps_floor) * max(spectral, 1e-300)
        room = m_max - products
        q_next = _orthonormal_block(w, basis, cutoff, room)
        invariant = (q_next.shape[1] == 0 and room > 0) or products == n
        if invariant or room == 0 or products >= next_check:
            next_check = products + max(CHECK_EVERY, products // CHECK_FRACTION)
            gram = (w.T @ w).double().cpu()
            theta, residuals = _ritz(diagonal, lower, gram)
            if invariant:
                residuals = torch.zeros_like(theta)
            top = min(top_k, theta.numel())
            bottom = min(bottom_k, theta.numel())
            wanted = torch.cat([residuals[theta.numel() - top :], residuals[:bottom]])
            limit = tolerance * max(float(theta.abs().max()), 1e-300)
            converged = invariant or bool((wanted <= limit).all())
            if converged or room == 0:
                break
        lower.append((q_next.T @ w).double().cpu())
        q = q_next
    top = min(top_k, theta.numel())
    bottom = min(bottom_k, theta.numel())
    top_vals = theta[theta.numel() - top :].flip(0).tolist()
    bottom_vals = theta[:bottom].tolist()
    bounds = residuals[theta.numel() - top :].flip(0).tolist() + residuals[:bottom].tolist()
    return top_vals, bottom_vals, bounds, len(diagonal), products, converged
