"""Fisher merging — each parameter entry averaged with weights from every model's diagonal Fisher.

Paper: Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher Weighting", arXiv 2111.09832.
Follows ``../shared/specs/data-aware.md`` §4.

Per tensor, model i with delta D_i = theta_i - theta_0 and diagonal Fisher F_i (model i on
its own task data, ``mergeflow collect-stats --kind fisher``: sampled labels, per-entry squared
gradients over scored tokens), per entry p:
    F~_i = F_i + eps                            (every model; eps absolute, in F's units)
    l_i <- l_i / ||F_i||_2                      (``normalize``: norm over every merged tensor of model i)
    D*[p] = sum_i l_i F~_i[p] D_i[p] / sum_i l_i F~_i[p],    theta* = theta_0 + lambda D*
The same theta* as merging the weights (the weights sum to 1 per entry). An entry no model's
Fisher reaches (eps 0, all F_i = 0) keeps the base. The share of entries where every F_i < eps
(they fall back to the l-weighted mean) is logged. Every float tensor needs a Fisher.
Defaults: eps 1e-6 and normalize on (FusionBench; Matena's default normalises too), l_i = 1
(FusionBench's 1/K: the formula is invariant to a common factor). One model: its delta.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from merging.errors import StatisticsError
from merging.params import MethodParams, ModelParams
from merging.spec import Factors, MethodSpec, ModelStatsNeed, TensorGroup

__all__ = ["FisherParams", "FisherModelParams", "fisher_delta", "combine", "SPEC"]

log = logging.getLogger(__name__)

LOW_FISHER_WARNING = 0.5
"""Warn when more than this share of a tensor's entries has every F_i below eps."""


class FisherParams(MethodParams):
    eps: float = Field(1e-6, ge=0.0, description="Added to every Fisher entry (absolute, in Fisher units).")
    normalize: bool = Field(True, description="Divide each model's weight by the L2 norm of its Fisher over the merged tensors.")


class FisherModelParams(ModelParams):
    weight: float = Field(1.0, gt=0.0, description="l_i: this model's weight.")
    stats: str | None = Field(None, description="This model's Fisher file ('mergeflow collect-stats MODEL DATA --kind fisher').")


def fisher_delta(deltas: torch.Tensor, fishers: torch.Tensor, weights: torch.Tensor, eps: float,
                 name: str = "tensor") -> torch.Tensor:
    """sum_i l_i (F_i + eps) D_i / sum_i l_i (F_i + eps) over deltas and Fishers (T, *shape); weights l (T,)."""
    fishers = fishers.to(deltas.dtype)
    low = (fishers < eps).all(dim=0).float().mean() if eps > 0 else torch.zeros(())
    log.debug("fisher: tensor %r: %.2f%% of its entries have every Fisher below eps %g", name, 100 * float(low), eps)
    if float(low) > LOW_FISHER_WARNING:
        log.warning("fisher: tensor %r: %.0f%% of its entries have every Fisher below eps %g (they take the weighted "
                    "mean); lower eps if the statistics are small", name, 100 * float(low), eps)
    scaled = weights.to(deltas.dtype).reshape((-1,) + (1,) * (deltas.dim() - 1)) * (fishers + eps)
    total = scaled.sum(dim=0)
    merged = (scaled * deltas).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, merged, torch.zeros_like(merged))


def combine(group: TensorGroup, factors: Factors, params: FisherParams) -> torch.Tensor:
    deltas = factors["deltas"]
    if group.model_stats is None:
        raise StatisticsError(f"fisher: tensor {group.name!r} has no Fisher statistics; give every model's 'stats' file")
    weights = [p.weight for p in group.model_params]
    if params.normalize:
        for t, stat in enumerate(group.model_stats):
            if stat.model_norm <= 0:
                raise StatisticsError(f"fisher: models[{t}]: its Fisher is zero over every merged tensor (seen at "
                                      f"{group.name!r}); recollect it, or set normalize: false")
        weights = [w / s.model_norm for w, s in zip(weights, group.model_stats)]
    fishers = torch.stack([s.value for s in group.model_stats]).to(deltas.device)
    return fisher_delta(deltas, fishers, torch.tensor(weights, dtype=torch.float64), params.eps, group.name)


SPEC = MethodSpec(
    name="fisher", params=FisherParams, model_params=FisherModelParams, combine=combine,
    paper="Matena & Raffel 2022, Merging Models with Fisher Weighting, arXiv 2111.09832",
    model_stats=ModelStatsNeed(kind="fisher", tensor_kinds=frozenset({"matrix", "other"})),
)
