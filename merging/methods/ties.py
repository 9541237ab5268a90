"""TIES-Merging — trim, elect sign, disjoint merge.

Paper: Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging
Models", arXiv 2306.01708.

Math, per task delta tau_t (T tasks):
    1. trim:  keep the top ``density`` fraction of |tau_t| (per tensor or whole model);
    2. elect: gamma = sign(sum_t tau_t') per coordinate ("mass" vote);
    3. merge: keep entries agreeing with gamma; mean over the agreeing models
       (``normalize: true``, divisor = summed weights of agreeing models) or their sum;
    theta = theta_0 + lambda * merged.
Stages: sparsify = trim + election mask; combine = disjoint mean / sum.

Two conventions, both available (``../shared/specs/svd-methods.md`` §2 and mergekit.md §1):
  * default, as mergekit 0.1.5: ``trim_scope: tensor`` keeps exactly
    ``max(1, floor(density * N))`` entries per tensor; weights scale the deltas before the
    vote (``weight_before_election: true``); zero mass elects ``+`` (``sign_tie_rule:
    positive``);
  * the paper / FusionBench: ``trim_scope: model`` keeps ``|v| >= `` the
    ``(D - floor(D * density))``-th smallest magnitude over the whole model (floor(D k)+1
    entries without ties), ``weight_before_election: false``, ``sign_tie_rule: majority``.
``density`` defaults to the paper's 0.2 (k = 20 %); density 1 disables trimming.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from merging.kernels.fuse import combine_sign_elected
from merging.kernels.sparsify import keep_topk, trim_below
from merging.params import KnotsSpaceParams, WeightedModelParams
from merging.spec import Factors, GlobalTrim, MethodSpec, TensorGroup


class TiesModelParams(WeightedModelParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="Fraction of each delta kept by magnitude.")


class TiesParams(KnotsSpaceParams):
    normalize: bool = Field(True, description="Disjoint mean (true) or disjoint sum (false).")
    trim_scope: Literal["tensor", "model"] = Field("tensor", description="Top-k per tensor (mergekit) or over the whole model (paper).")
    weight_before_election: bool = Field(True, description="mergekit: weights affect the sign vote; paper: false.")
    sign_tie_rule: Literal["positive", "majority"] = Field("positive", description="Sign at zero mass: + (mergekit) or the tensor's majority (paper).")
    int8_mask: bool = Field(False, description="Accepted for mergekit configs; has no effect here.")


def trim_by_magnitude(group: TensorGroup, deltas: torch.Tensor, densities: list[float]) -> torch.Tensor:
    """Per-tensor exact top-k, or the whole-model thresholds when the engine computed them."""
    trimmed = torch.empty_like(deltas)
    for t, density in enumerate(densities):
        if group.trim_thresholds is not None:
            trimmed[t] = trim_below(deltas[t], group.trim_thresholds[t])
        elif density >= 1:
            trimmed[t] = deltas[t]
        else:
            keep_topk(deltas[t], max(1, math.floor(density * deltas[t].numel())), out=trimmed[t])
    return trimmed


def sparsify(group: TensorGroup, factors: Factors, params: TiesParams, rng: torch.Generator) -> Factors:
    densities = [p.density for p in group.model_params]
    return {"deltas": trim_by_magnitude(group, factors["deltas"], densities)}


def model_scope_trim(params: TiesParams) -> GlobalTrim | None:
    """The paper's whole-model trim; in KnOTS space the matrices' representations always share
    one budget per task (the other tensors keep ``trim_scope``)."""
    if params.trim_scope != "model" and params.merge_space != "knots":
        return None
    kinds = {"matrix", "other"} if params.trim_scope == "model" else {"matrix"}
    return GlobalTrim(
        kinds=frozenset(kinds),
        kth_smallest=lambda n, model: 0 if model.density >= 1 else n - math.floor(n * model.density),
    )


SPEC = MethodSpec(
    name="ties",
    params=TiesParams,
    model_params=TiesModelParams,
    sparsify=sparsify,
    combine=combine_sign_elected,
    global_trim=model_scope_trim,
    paper="Yadav et al. 2023, TIES-Merging, arXiv 2306.01708",
    param_stages={"density": "sparsify", "trim_scope": "sparsify", "merge_space": "sparsify"},
)
