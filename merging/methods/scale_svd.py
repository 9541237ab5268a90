"""Scale-SVD — activation-scaled low-rank plus sparse task vectors, then isotropic merging.

Source: the "Scale-SVD" section of the ArkNightmaster/AwRank-Merging fork of iso-merging
(github, 2025); the decomposition is OATS (Zhang & Papyan, ICLR 2025, "OATS: Outlier-Aware
Pruning Through Sparse and Low Rank Decomposition", arXiv 2409.13652) applied to each task
vector. Follows ``../shared/specs/svd-methods.md`` §12.

Per task t and 2-D matrix W = tau_t (d_out, d_in), a = per-input-feature activation
statistic of that layer on the base model (``mergeflow collect-stats``: mean of x_j^2; a = 1
when no statistics are given, then it is plain robust-PCA-style L + S):
  W~ = W diag(sqrt a);  k = max(1, floor(kappa (1 - rho) d_out d_in / (d_out + d_in))), <= min dim;
  u = 1 - (1 - kappa)(1 - rho) (fraction of S pruned);  S = 0;
  repeat ``iterations`` times:  L = rank-k SVD of (W~ - S);  S = W~ - L;
      zero the floor(u d_in) smallest |S| of each row (mask: row) or floor(u numel) overall (global);
  cleaned tau_t = (L + S) diag(1 / sqrt a).
The cleaned task vectors are merged by Iso-CTS (default), Iso-C or a plain sum; other tensors
take the mean (iso) or sum. Defaults: rank_ratio kappa 0.75, sparsity rho 0.1, 10 iterations,
row mask. No randomness; needs activation statistics for the scaled variant.
LoRA inputs: a task of rank r_t <= k is its own rank-k part (L = W~ from the first SVD, the
residual is zero, so S stays zero and the cleaned task vector is the input, whatever the
positive statistics), so the merge is Iso-CTS / Iso-C of the LoRA inputs on their factor route
(``merging.methods.iso``), without the iterations' dense SVDs. Zero statistics (a column
zeroed by the cleaning) or r_t > k take the dense route.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merging.errors import MergeConfigError
from merging.kernels.sparsify import keep_topk, keep_topk_rows
from merging.methods.iso import iso_c_factors, iso_c_lora_factors, iso_cts_factors, iso_cts_lora_factors
from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class ScaleSvdParams(MethodParams):
    rank_ratio: float = Field(0.75, gt=0.0, le=1.0, description="kappa: share of the budget given to the low-rank part.")
    sparsity: float = Field(0.1, ge=0.0, lt=1.0, description="rho: overall compression of each task vector.")
    iterations: int = Field(10, ge=1, description="Alternating SVD / prune steps.")
    mask: Literal["row", "global"] = Field("row", description="Prune the sparse part per row or over the whole matrix.")
    merge: Literal["iso_cts", "iso_c", "sum"] = Field("iso_cts", description="How the cleaned task vectors are merged.")
    common_space_fraction: float = Field(0.8, gt=0.0, le=1.0, description="Iso-CTS common subspace fraction.")


def low_rank_plus_sparse(w: torch.Tensor, scale: torch.Tensor | None, rank_ratio: float, sparsity: float,
                         iterations: int, mask: str) -> torch.Tensor:
    """OATS-style L + S approximation of ``w`` (d_out, d_in) in the activation-scaled space."""
    d_out, d_in = w.shape
    root = torch.ones(d_in, dtype=w.dtype, device=w.device) if scale is None else scale.to(w).clamp(min=0).sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    scaled = w * root
    k = low_rank_size(d_out, d_in, rank_ratio, sparsity)
    pruned_fraction = 1 - (1 - rank_ratio) * (1 - sparsity)
    sparse = torch.zeros_like(scaled)
    low_rank = scaled
    for _ in range(iterations):
        u, s, vh = torch.linalg.svd(scaled - sparse, full_matrices=False)
        low_rank = (u[:, :k] * s[:k]) @ vh[:k]
        residual = scaled - low_rank
        if mask == "row":
            sparse = keep_topk_rows(residual, d_in - int(pruned_fraction * d_in))
        else:
            sparse = keep_topk(residual, residual.numel() - int(pruned_fraction * residual.numel()))
    return (low_rank + sparse) / safe


def low_rank_size(d_out: int, d_in: int, rank_ratio: float, sparsity: float) -> int:
    """k, the rank of the low-rank part of a (d_out, d_in) matrix."""
    return min(max(1, int(rank_ratio * (1 - sparsity) * d_out * d_in / (d_out + d_in))), min(d_out, d_in))


def decompose(group: TensorGroup, params: ScaleSvdParams) -> Factors:
    deltas = group.deltas
    if group.kind != "matrix":
        return {"mean": deltas.mean(dim=0) if params.merge != "sum" else deltas.sum(dim=0)}
    lora = group.lora
    if (lora is not None and params.merge != "sum" and (group.stats is None or bool((group.stats > 0).all()))
            and max(a.shape[0] for a in lora.a) <= low_rank_size(*deltas.shape[-2:], params.rank_ratio, params.sparsity)):
        # a rank-r_t task with r_t <= k is its own rank-k part: L = W~, S = 0 from the first step on, so the
        # cleaned task vectors are the inputs and the merge is Iso-CTS / Iso-C of the LoRA inputs (factor route)
        if params.merge == "iso_c":
            return iso_c_lora_factors(group)
        return iso_cts_lora_factors(group, params.common_space_fraction)
    if group.stats is not None and tuple(group.stats.shape) != (deltas.shape[-1],):
        raise MergeConfigError(
            f"scale_svd: statistics of tensor {group.name!r} have shape {tuple(group.stats.shape)}, expected "
            f"({deltas.shape[-1]},) (one value per input feature); recollect them with 'mergeflow collect-stats'"
        )
    cleaned = torch.stack([
        low_rank_plus_sparse(d, group.stats, params.rank_ratio, params.sparsity, params.iterations, params.mask) for d in deltas
    ])
    if params.merge == "sum":
        return {"mean": cleaned.sum(dim=0)}
    if params.merge == "iso_c":
        return iso_c_factors(cleaned)
    return iso_cts_factors(cleaned, params.common_space_fraction)


def combine(group: TensorGroup, factors: Factors, params: ScaleSvdParams) -> torch.Tensor:
    if "mean" in factors:
        return factors["mean"]
    return factors["scale"] * (factors["u"] @ factors["vh"])


SPEC = MethodSpec(
    name="scale_svd", params=ScaleSvdParams, decompose=decompose, combine=combine,
    paper="Scale-SVD (AwRank-Merging fork of iso-merging), OATS: Zhang & Papyan 2025, arXiv 2409.13652",
    uses_stats=True,
    param_stages={k: "decompose" for k in ("rank_ratio", "sparsity", "iterations", "mask", "merge", "common_space_fraction")},
)
