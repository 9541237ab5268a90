"""DARE — Drop And REscale, then Task Arithmetic (``dare_linear``) or TIES (``dare_ties``).

Paper: Yu et al., ICML 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", arXiv 2311.03099.

Math, per tensor and task: m ~ Bernoulli(density) element-wise (draws from the generator
seeded by (seed, tensor name)); tau_t' = rescale(m * tau_t); then
    dare_linear: merged = sum_t w_t tau_t'          (normalize: false)
    dare_ties:   TIES sign election + disjoint fuse of w_t tau_t' (normalize: false)
    theta = theta_0 + lambda * merged
Rescale: ``l1`` (default, mergekit 0.1.5: match the L1 norm of the tensor),
``inverse`` (the paper: divide survivors by density, so E[tau'] = tau) or ``none``.
``density`` defaults to 0.1 (drop rate p = 0.9, the paper's LLM setting); density 1 keeps
everything. Follows ``../shared/specs/svd-methods.md`` §8.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from merging.kernels.fuse import combine_sign_elected, combine_weighted_sum
from merging.kernels.rescale import Rescale, apply_rescale, parse_rescale
from merging.params import KnotsSpaceParams, MethodParams, WeightedModelParams
from merging.rng import uniform
from merging.spec import Factors, MethodSpec, TensorGroup


class DareModelParams(WeightedModelParams):
    density: float = Field(0.1, gt=0.0, le=1.0, description="Keep probability 1 - p.")


class DareParams(MethodParams):
    rescale: Rescale = Field("l1", description="l1 (mergekit), inverse (paper 1/density) or none; true = l1.")
    normalize: bool = Field(False, description="Divide by the (agreeing) weights' sum.")
    int8_mask: bool = Field(False, description="Accepted for mergekit configs; has no effect here.")

    _rescale = field_validator("rescale", mode="before")(parse_rescale)


class DareTiesParams(DareParams, KnotsSpaceParams):
    weight_before_election: bool = Field(True, description="mergekit: weights affect the sign vote.")
    sign_tie_rule: Literal["positive", "majority"] = Field("positive", description="Sign at zero mass.")


def drop_and_rescale(group: TensorGroup, deltas: torch.Tensor, rescale: Rescale, rng: torch.Generator) -> torch.Tensor:
    """Random drop of each task delta, one draw per task in order from ``rng``."""
    out = torch.empty_like(deltas)
    for t, model in enumerate(group.model_params):
        if model.density >= 1:
            out[t] = deltas[t]
            continue
        keep = uniform(deltas[t].shape, rng, deltas[t]) < model.density
        out[t] = apply_rescale(deltas[t], keep, model.density, rescale)
    return out


def sparsify(group: TensorGroup, factors: Factors, params: DareParams, rng: torch.Generator) -> Factors:
    return {"deltas": drop_and_rescale(group, factors["deltas"], params.rescale, rng)}





PAPER = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv 2311.03099"
LINEAR_SPEC = MethodSpec(name="dare_linear", params=DareParams, model_params=DareModelParams,
                         sparsify=sparsify, combine=combine_weighted_sum, random=True, paper=PAPER,
                       param_stages={"density": "sparsify", "rescale": "sparsify"})
TIES_SPEC = MethodSpec(name="dare_ties", params=DareTiesParams, model_params=DareModelParams,
                       sparsify=sparsify, combine=combine_sign_elected, random=True, paper=PAPER,
                       param_stages={"density": "sparsify", "rescale": "sparsify", "merge_space": "sparsify"})
