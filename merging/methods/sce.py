"""SCE — Select, Calculate, Erase: variance-selected, energy-weighted, sign-consistent fusion.

Paper: Wan et al., 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990
(the SCE merge); as implemented in mergekit 0.1.5 ``sce`` (github.com/arcee-ai/mergekit).

Math, per tensor, task deltas tau_t (T models, N entries):
    Select:    with select_topk = s < 1, keep the positions of the k = int(s * #{var > 0})
               largest variances var_j = Var_t(tau_t,j) (population variance across models),
               in every tau_t; s <= 0 keeps nothing, s = 1 (default) keeps everything.
    Calculate: w_t = mean_j(tau_t,j^2) / sum_t' mean_j(tau_t',j^2); 1/T each if that sum < 1e-6.
    Erase:     elected sign gamma_j = + if sum_t tau_t,j >= 0 else -; keep the entries that
               are non-zero and agree with gamma (TIES election, mergekit's zero-mass rule).
    merged_j = sum_t w_t m_t,j tau_t,j / max(sum_t w_t m_t,j, 1e-6),   theta = theta_0 + lambda merged.
No per-model weights (mergekit has none). Stages: sparsify = the variance selection, combine
= weights, election and fusion. Top-k ties keep the lower flat index (deterministic);
k uses mergekit's float32 product so it never differs from it by one.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.kernels.sign import agreement_mask, elect_sign
from merging.kernels.sparsify import keep_topk
from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class SceParams(MethodParams):
    select_topk: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the highest-variance positions kept.")
    int8_mask: bool = Field(False, description="Accepted for mergekit configs; has no effect here.")


def select_by_variance(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Positions of the largest variances across models, shape ``deltas.shape[1:]``, bool."""
    if fraction >= 1:
        return torch.ones_like(deltas[0], dtype=torch.bool)
    if fraction <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)  # a float32 product, as mergekit
    return keep_topk(variance, k) != 0


def sparsify(group: TensorGroup, factors: Factors, params: SceParams, rng: torch.Generator) -> Factors:
    deltas = factors["deltas"]
    if params.select_topk >= 1:
        return factors
    return {"deltas": deltas * select_by_variance(deltas, params.select_topk)}


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """w_t = mean(tau_t^2), normalized to sum 1 (uniform when the sum is below 1e-6): ``(T,)``."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


def combine(group: TensorGroup, factors: Factors, params: SceParams) -> torch.Tensor:
    deltas = factors["deltas"]  # (T, ...)
    agree = agreement_mask(deltas, elect_sign(deltas, tie_rule="positive"))
    weights = energy_weights(deltas).reshape((-1,) + (1,) * (deltas.dim() - 1)) * agree  # (T, ...)
    return (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


SPEC = MethodSpec(
    name="sce",
    params=SceParams,
    sparsify=sparsify,
    combine=combine,
    paper="Wan et al. 2024, FuseChat (SCE), arXiv 2408.07990",
    param_stages={"select_topk": "sparsify"},
)
