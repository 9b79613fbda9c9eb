"""Output losses shared by the objectives with a model-output structure (softmax regression,
the mlp, exported programs), in forms that keep their digits where a class is near certain.

logsumexp(z) - z_y, the textbook cross-entropy, cancels to 0 once the label's class leads
the others by ~17 (float32) or ~37 (float64), and its derivatives p_y - 1 and p_m (1 - p_m)
cancel where a class m is near certain; these forms are written around each row's largest
class instead.
"""

from __future__ import annotations

import torch


def l2_penalty(w: torch.Tensor, l2: float) -> torch.Tensor:
    """0.5 l2 ||w||^2; with l2 = 0 a zero still on w's graph, never 0 x inf: w of 1e200 (its
    square inf) made an l2 = 0 loss NaN and a finite point was refused."""
    if l2 == 0:
        return torch.sum(w * 0.0)
    return 0.5 * l2 * torch.sum(w * w)


def mean_squared(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean((outputs - targets)^2) over every entry."""
    return torch.mean((outputs - targets) ** 2)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row -log softmax(logits)[label] for logits (N, k) and int64 labels (N,).

    A row whose label's class is (one of) the largest takes log1p(sum over j != y of
    e^(z_j - z_y)); any other (z_m - z_y) + log1p(sum over j != m of e^(z_j - z_m)), m its
    largest class. Every exponent is <= 0, and autograd's derivatives are made of the small
    e^(...) terms: no 1 - p to cancel where a class is near certain, label or not (a single
    form pivoted on m would add z_y's +1 and -1 to the small rest first)."""
    lab = labels.unsqueeze(1)
    picked = logits.gather(1, lab)
    top = logits.argmax(dim=1, keepdim=True)
    largest = logits.gather(1, top)
    leads = (largest <= picked).squeeze(1)
    # each branch is fed only the rows it takes: e^(z_j - z_y) of another row may overflow
    d = torch.where(leads.unsqueeze(1), logits - picked, 0.0)
    own = torch.log1p(torch.exp(d).scatter(1, lab, 0.0).sum(dim=1))
    rest = torch.exp(logits - largest).scatter(1, top, 0.0).sum(dim=1)
    other = (largest - picked).squeeze(1) + torch.log1p(rest)
    return torch.where(leads, own, other)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over rows of cross_entropy_rows."""
    return torch.mean(cross_entropy_rows(logits, labels))


def softmax_curvature(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, H): the rows' class probabilities and per-row Hessians diag(p) - p p^T of the
    cross-entropy in the logits, each diagonal entry p_c (1 - p_c) with 1 - p_c summed from
    the other classes' p_j for the row's largest class (where it would cancel)."""
    p = torch.softmax(logits, dim=1)
    top = p.argmax(dim=1, keepdim=True)
    rest = 1 - p
    rest = rest.scatter(1, top, p.scatter(1, top, 0.0).sum(dim=1, keepdim=True))
    hess = -p.unsqueeze(2) * p.unsqueeze(1)
    hess.diagonal(dim1=1, dim2=2).copy_(p * rest)
    return p, hess


def cross_entropy_residual(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p - onehot(labels), the cross-entropy's gradient in the logits, with p_y - 1 taken as
    -(sum of the other classes' p_j)."""
    lab = labels.unsqueeze(1)
    others = p.scatter(1, lab, 0.0)
    return others.scatter(1, lab, -others.sum(dim=1, keepdim=True))
