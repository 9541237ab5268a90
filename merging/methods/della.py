"""DELLA — MAGPRUNE (magnitude-ranked random drop), sign election, fuse.

Paper: Deep, Bhardwaj & Poria, 2024, "DELLA-Merging: Reducing Interference in Model
Merging through Magnitude-Based Sampling", arXiv 2406.11617.

Math, per task delta tau_t, per row (a 1-D tensor is one row) of n entries: rank entries by
|.| (0 = smallest .. n-1 = largest), keep probability
    q = (density - epsilon) + 2 epsilon * rank / (n - 1),
mask m ~ Bernoulli(q) (draws from the generator seeded by (seed, tensor name)), rescale;
then
    della:        TIES sign election on w_t tau_t', disjoint mean (normalize: true)
    della_linear: sum_t w_t tau_t' (normalize: false)
    theta = theta_0 + lambda * merged.
``epsilon`` is the half-window (mergekit's convention; the paper's window 0.14 is epsilon
0.07). Defaults: density 0.7 (drop 0.3) and epsilon 0.07, the paper's example; rescale
``l1`` as mergekit 0.1.5 (``inverse`` divides each survivor by its q, as the paper).
Requires 0 < density - epsilon and density + epsilon < 1.
See ``../shared/specs/circuit-della-peft.md`` §2.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from merging.kernels.fuse import combine_sign_elected, combine_weighted_sum
from merging.kernels.rescale import Rescale, apply_rescale, parse_rescale
from merging.kernels.sparsify import magprune_rank_probabilities
from merging.params import MethodParams, WeightedModelParams
from merging.rng import uniform
from merging.spec import Factors, MethodSpec, TensorGroup


class DellaModelParams(WeightedModelParams):
    density: float = Field(0.7, gt=0.0, le=1.0, description="Mean keep probability (1 - drop rate).")
    epsilon: float = Field(0.07, ge=0.0, lt=0.5, description="Half-width of the keep-probability window.")

    @model_validator(mode="after")
    def _window_inside_unit_interval(self) -> DellaModelParams:
        if self.density < 1 and not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise ValueError(
                f"density ± epsilon must lie in (0, 1); got density={self.density}, epsilon={self.epsilon}"
            )
        return self


class DellaParams(MethodParams):
    rescale: Rescale = Field("l1", description="l1 (mergekit), inverse (paper 1/q) or none; true = l1.")
    normalize: bool = Field(True, description="Disjoint weighted mean (true) or sum (false).")
    weight_before_election: bool = Field(True, description="mergekit: weights affect the sign vote.")
    sign_tie_rule: Literal["positive", "majority"] = Field("positive", description="Sign at zero mass.")
    int8_mask: bool = Field(False, description="Accepted for mergekit configs; has no effect here.")

    _rescale = field_validator("rescale", mode="before")(parse_rescale)


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="Divide by the weights' sum.")


def sparsify(group: TensorGroup, factors: Factors, params: DellaParams, rng: torch.Generator) -> Factors:
    deltas = factors["deltas"]
    out = torch.empty_like(deltas)
    for t, model in enumerate(group.model_params):
        if model.density >= 1:
            out[t] = deltas[t]
            continue
        keep_prob = magprune_rank_probabilities(deltas[t], model.density, model.epsilon)
        keep = uniform(deltas[t].shape, rng, deltas[t]) < keep_prob
        out[t] = apply_rescale(deltas[t], keep, keep_prob, params.rescale)
    return {"deltas": out}





PAPER = "Deep, Bhardwaj & Poria 2024, DELLA-Merging, arXiv 2406.11617"
TIES_SPEC = MethodSpec(name="della", params=DellaParams, model_params=DellaModelParams,
                       sparsify=sparsify, combine=combine_sign_elected, random=True, paper=PAPER,
                       param_stages={"density": "sparsify", "epsilon": "sparsify", "rescale": "sparsify"})
LINEAR_SPEC = MethodSpec(name="della_linear", params=DellaLinearParams, model_params=DellaModelParams,
                         sparsify=sparsify, combine=combine_weighted_sum, random=True, paper=PAPER,
                       param_stages={"density": "sparsify", "epsilon": "sparsify", "rescale": "sparsify"})
