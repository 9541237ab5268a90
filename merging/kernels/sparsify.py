"""Sparsification kernels: magnitude top-k, thresholds, outlier trimming, DELLA's MAGPRUNE
rank probabilities, and norm-matching rescale.

All selections use ``kthvalue`` (a selection, not a full sort). Keep counts are exact:
``keep_topk(x, k)`` keeps exactly ``k`` entries; ties at the threshold are broken by flat
index order (earlier entries first), so the result is deterministic.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "keep_topk",
    "keep_topk_rows",
    "trim_below",
    "drop_outliers_and_small",
    "magprune_rank_probabilities",
    "rescale_to_norm",
]


def _exact_topk_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries along the last dim; ties by index."""
    n = magnitudes.shape[-1]
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    threshold = torch.kthvalue(magnitudes, n - k + 1, dim=-1, keepdim=True).values
    above = magnitudes > threshold
    tied = magnitudes == threshold
    need = k - above.sum(dim=-1, keepdim=True)
    tied_rank = torch.cumsum(tied.to(torch.int64), dim=-1)
    return above | (tied & (tied_rank <= need))


def keep_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the ``k`` largest-magnitude entries of ``x`` (whole tensor)."""
    flat = x.reshape(-1)
    mask = _exact_topk_mask(flat.abs(), k)
    return (flat * mask).reshape(x.shape)


def keep_topk_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the ``k`` largest-magnitude entries of each slice along the last dim."""
    mask = _exact_topk_mask(x.abs(), k)
    return x * mask


def trim_below(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Zero every entry with ``|x| < threshold`` (ties at the threshold are kept)."""
    return torch.where(x.abs() < threshold, torch.zeros_like(x), x)


def drop_outliers_and_small(x: torch.Tensor, density: float, gamma: float, per_row: bool = False) -> torch.Tensor:
    """Model Breadcrumbs mask.

    Over the whole tensor (mergekit) or each slice along the last dim (the paper's code):
    drop the ``floor(gamma * n)`` largest magnitudes, then the smallest ones so that
    ``floor(density * n)`` entries stay; when ``density + gamma > 1`` the outlier cut shrinks
    so that the density is met. Ties are broken by index order.
    """
    if density >= 1 or x.numel() == 0:
        return x
    rows = x.reshape(-1) if not per_row or x.dim() == 0 else x
    n = rows.shape[-1]
    keep = math.floor(density * n)
    n_top = math.floor(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    n_top = n - keep - n_bottom
    magnitudes = rows.abs()
    not_top = ~_exact_topk_mask(magnitudes, n_top)
    not_bottom = _exact_topk_mask(magnitudes, n - n_bottom)
    return (rows * (not_top & not_bottom)).reshape(x.shape)


def magprune_rank_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities per row: ``(density - eps) + 2 eps * rank_norm``.

    Ranks are taken along the last dim (a 1-D tensor is one row); rank_norm is 0 for the
    smallest magnitude and 1 for the largest. Needs one argsort per row for the ranks.
    """
    rows = x if x.dim() >= 2 else x.unsqueeze(0)
    n = rows.shape[-1]
    order = torch.argsort(rows.abs(), dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=x.device).expand_as(order))
    rank_norm = ranks.to(x.dtype) / max(n - 1, 1)
    probs = (density - epsilon) + 2.0 * epsilon * rank_norm
    return probs.reshape(x.shape)


def rescale_to_norm(original: torch.Tensor, masked: torch.Tensor, norm: str = "l1", eps: float = 1e-7) -> torch.Tensor:
    """Scale ``masked`` so that its ``norm`` (l1 | l2 | linf) equals ``original``'s."""
    if norm == "l1":
        before, after = original.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = original.norm(), masked.norm()
    elif norm == "linf":
        before, after = original.abs().max(), masked.abs().max()
    else:
        raise ValueError(f"unknown norm {norm!r}")
    if before < eps or after < eps:
        return masked
    return masked * (before / after)
