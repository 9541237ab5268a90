"""Rescaling of randomly dropped deltas, three conventions.

* ``"l1"`` — mergekit 0.1.5: one scalar per tensor so that ||masked||_1 = ||delta||_1;
* ``"inverse"`` — the DARE / DELLA papers: each survivor divided by its keep probability
  (E[masked] = delta);
* ``"none"`` — no rescale.
mergekit configs write ``rescale: true | false``; true means ``"l1"``.
"""

from __future__ import annotations

from typing import Literal

import torch

from merging.kernels.sparsify import rescale_to_norm

__all__ = ["Rescale", "parse_rescale", "apply_rescale"]

Rescale = Literal["l1", "inverse", "none"]


def parse_rescale(value: object) -> object:
    """Map mergekit's booleans onto the named conventions (pydantic ``before`` validator)."""
    if value is True:
        return "l1"
    if value is False:
        return "none"
    return value


def apply_rescale(delta: torch.Tensor, keep: torch.Tensor, keep_prob: torch.Tensor | float, rescale: Rescale) -> torch.Tensor:
    """Masked ``delta`` rescaled by the chosen convention."""
    masked = delta * keep
    if rescale == "l1":
        return rescale_to_norm(delta, masked, "l1")
    if rescale == "inverse":
        return masked / keep_prob
    return masked
