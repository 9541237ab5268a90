"""TALL masks and Consensus Merging — keep the weights that tasks agree are theirs.

Paper: Wang, Dimitriadis et al., ICML 2024, "Localizing Task Information for Improved Model
Merging and Compression", arXiv 2405.07813. Follows ``../shared/specs/svd-methods.md`` §3.

Element-wise on every tensor, tau_t = theta_t - theta_0:
  tau_MTL  = sum_t tau_t                 (mtl: task_arithmetic, the default)
           | TIES(tau) with k = ties_density per tensor, majority sign, disjoint sum (mtl: ties);
  mask m_t = 1[ |tau_t| > lambda_t |tau_MTL - tau_t| ]   (strict >; per-model tall_lambda);
  consensus:  keep coordinates that at least k tasks claim (count >= k, default 2: drops the
              "catastrophic" (0) and "selfish" (1) weights): merged = 1[count >= k] * tau_MTL;
  tall_masks: with ``task_index`` = t, task t's own reconstruction m_t * tau_MTL (TALL's
              compression use: one shared tau_MTL plus a binary mask per task); without it,
              the union of the masks (k = 1).
theta = theta_0 + lambda * merged. The paper picks lambda_t in {0.2, ..., 0.6} per task on
its validation split; the default 0.4 is the middle of that grid. k = 0 is plain tau_MTL;
k > T keeps nothing (the base). No randomness.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merging.errors import MergeConfigError
from merging.kernels.sign import agreement_mask, elect_sign
from merging.kernels.sparsify import keep_topk
from merging.params import MethodParams, ModelParams
from merging.spec import Factors, MethodSpec, TensorGroup

PAPER = "Wang, Dimitriadis et al. 2024, TALL masks / Consensus Merging, arXiv 2405.07813"


class TallModelParams(ModelParams):
    tall_lambda: float = Field(0.4, ge=0.0, description="lambda_t of this task's mask.")


class ConsensusParams(MethodParams):
    k: int = Field(2, ge=0, description="Keep coordinates claimed by at least k tasks.")
    mtl: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description="The multi-task vector the masks are taken against.")
    ties_density: float = Field(0.2, gt=0.0, le=1.0, description="Per-tensor keep fraction of the TIES multi-task vector.")


class TallMasksParams(ConsensusParams):
    k: int = Field(1, ge=0, description="Union of the masks when no task_index is given.")
    task_index: int | None = Field(None, ge=0, description="Reconstruct this task (0-based, in model order) instead of the union.")


def multitask_vector(deltas: torch.Tensor, mtl: str, density: float) -> torch.Tensor:
    """tau_MTL of a task stack (T, ...)."""
    if mtl == "task_arithmetic":
        return deltas.sum(dim=0)
    trimmed = torch.stack([keep_topk(d, int(density * d.numel())) for d in deltas])
    return (trimmed * agreement_mask(trimmed, elect_sign(trimmed, tie_rule="majority"))).sum(dim=0)


def task_masks(deltas: torch.Tensor, tau_mtl: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """m_t = |tau_t| > lambda_t |tau_MTL - tau_t|, stacked (T, ...) as booleans."""
    lam = lambdas.reshape((-1,) + (1,) * (deltas.dim() - 1)).to(deltas.dtype)
    return deltas.abs() > lam * (tau_mtl.unsqueeze(0) - deltas).abs()


def _factors(group: TensorGroup, params: ConsensusParams) -> tuple[torch.Tensor, torch.Tensor]:
    tau_mtl = multitask_vector(group.deltas, params.mtl, params.ties_density)
    lambdas = torch.tensor([p.tall_lambda for p in group.model_params], dtype=group.deltas.dtype, device=group.deltas.device)
    return tau_mtl, task_masks(group.deltas, tau_mtl, lambdas)


def combine_consensus(group: TensorGroup, factors: Factors, params: ConsensusParams) -> torch.Tensor:
    tau_mtl, masks = _factors(group, params)
    return tau_mtl * (masks.sum(dim=0) >= params.k)


def combine_tall(group: TensorGroup, factors: Factors, params: TallMasksParams) -> torch.Tensor:
    tau_mtl, masks = _factors(group, params)
    if params.task_index is None:
        return tau_mtl * (masks.sum(dim=0) >= params.k)
    if params.task_index >= group.num_models:
        raise MergeConfigError(f"tall_masks: task_index {params.task_index} but only {group.num_models} models")
    return tau_mtl * masks[params.task_index]


CONSENSUS_SPEC = MethodSpec(name="consensus", params=ConsensusParams, model_params=TallModelParams,
                            combine=combine_consensus, paper=PAPER)
TALL_SPEC = MethodSpec(name="tall_masks", params=TallMasksParams, model_params=TallModelParams,
                       combine=combine_tall, paper=PAPER)
