"""TIES sign election and disjoint aggregation over a task stack ``(T, ...)``.

Two conventions for positions where the summed mass is exactly zero:

* ``"majority"`` (TIES paper, DRM, FusionBench): fill with the sign of the sum of all
  elected signs of the tensor; if that is also 0, the position keeps no entry;
* ``"positive"`` (mergekit, peft): zero mass counts as ``+``.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["elect_sign", "agreement_mask", "disjoint_mean"]

TieRule = Literal["majority", "positive"]


def elect_sign(stack: torch.Tensor, tie_rule: TieRule = "majority", by: Literal["mass", "count"] = "mass") -> torch.Tensor:
    """Elected sign per position, shape ``stack.shape[1:]``, values in {-1, 0, +1}."""
    weight = stack.sum(dim=0) if by == "mass" else torch.sign(stack).sum(dim=0)
    if tie_rule == "positive":  # +1 where weight >= 0, else -1 (exact; a scalar torch.where is several times slower)
        return (weight >= 0).to(stack.dtype).mul_(2).sub_(1)
    sign = torch.sign(weight)
    return torch.where(sign == 0, torch.sign(sign.sum()), sign)


def agreement_mask(stack: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """True where an entry is non-zero and agrees with the elected sign."""
    return (torch.sign(stack) == sign.unsqueeze(0)) & (stack != 0)


def disjoint_mean(stack: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of kept entries over the count of kept entries (count clamped to >= 1)."""
    kept = stack if mask is None else stack * mask
    count = (kept != 0).sum(dim=0) if mask is None else mask.sum(dim=0)
    return kept.sum(dim=0) / count.clamp(min=1).to(stack.dtype)

