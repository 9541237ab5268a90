"""Model Breadcrumbs — drop the largest outliers and the smallest entries of each delta.

Paper: Davari & Belilovsky, ECCV 2024, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks", arXiv 2312.06795.

Math, per task delta tau_t with n entries (per tensor, or per row with ``per_row``):
drop the floor(gamma n) largest |tau_t| (outliers), keep the floor(density n) largest of the
rest, zero everything else. Then
    breadcrumbs:      merged = sum_t w_t tau_t'
    breadcrumbs_ties: TIES sign election + disjoint fuse
    theta = theta_0 + lambda * merged.
``density`` (the paper's beta, default 0.15) and ``gamma`` (outlier fraction, default 0.01
as mergekit) are per model. mergekit masks the whole tensor (default here); the paper's
code masks each row (``per_row: true``). See ``../shared/specs/svd-methods.md`` §7.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merging.kernels.fuse import combine_sign_elected, combine_weighted_sum
from merging.kernels.sparsify import drop_outliers_and_small
from merging.params import MethodParams, WeightedModelParams
from merging.spec import Factors, MethodSpec, TensorGroup


class BreadcrumbsModelParams(WeightedModelParams):
    density: float = Field(0.15, gt=0.0, le=1.0, description="Fraction of entries kept (beta).")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="Fraction of largest entries dropped as outliers.")


class BreadcrumbsParams(MethodParams):
    normalize: bool = Field(False, description="Divide by the (agreeing) weights' sum.")
    per_row: bool = Field(False, description="Mask each row (paper code) instead of the whole tensor (mergekit).")
    int8_mask: bool = Field(False, description="Accepted for mergekit configs; has no effect here.")


class BreadcrumbsTiesParams(BreadcrumbsParams):
    weight_before_election: bool = Field(True, description="mergekit: weights affect the sign vote.")
    sign_tie_rule: Literal["positive", "majority"] = Field("positive", description="Sign at zero mass.")


def sparsify(group: TensorGroup, factors: Factors, params: BreadcrumbsParams, rng: torch.Generator) -> Factors:
    deltas = factors["deltas"]
    out = torch.stack([
        drop_outliers_and_small(deltas[t], model.density, model.gamma, per_row=params.per_row)
        for t, model in enumerate(group.model_params)
    ])
    return {"deltas": out}





PAPER = "Davari & Belilovsky 2024, Model Breadcrumbs, arXiv 2312.06795"
LINEAR_SPEC = MethodSpec(name="breadcrumbs", params=BreadcrumbsParams, model_params=BreadcrumbsModelParams,
                         sparsify=sparsify, combine=combine_weighted_sum, paper=PAPER,
                       param_stages={"density": "sparsify", "gamma": "sparsify", "per_row": "sparsify"})
TIES_SPEC = MethodSpec(name="breadcrumbs_ties", params=BreadcrumbsTiesParams, model_params=BreadcrumbsModelParams,
                       sparsify=sparsify, combine=combine_sign_elected, paper=PAPER,
                       param_stages={"density": "sparsify", "gamma": "sparsify", "per_row": "sparsify"})
