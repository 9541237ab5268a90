"""KnOTS: align LoRA task updates with a joint SVD, then merge their representations model-wide.

Paper: Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS", arXiv 2410.19735
(code ``gstoica27/KnOTS``; FusionBench ``method/knots``). Follows ``../shared/specs/lora-core.md``
§4. Per LoRA-targeted matrix, T tasks D_t = s_t B_t A_t:

  decompose  H = [D_1 | ... | D_T] (n, T m) = U diag(s) [V_1^T | ... | V_T^T] by the factor route
             (``factor_svd.hstack_svd``, never forming H), float64; keep s_j > min_singular_value
             (absolute: the reference's 1e-5, FusionBench's 1e-4). Task representation
             X_t = diag(s) V_t^T (k, m); D_t = U X_t exactly for the kept triplets.
  merge      over ALL matrices of the model, each task's X_t flattened into one vector:
             optional DARE first (``core_space.drop_and_rescale`` per matrix, with that tensor's
             generator); TIES trim with one budget per task across layers: keep |x| >= tau_t,
             tau_t = the (N - floor(N density_t))-th smallest |x| of the N entries (the
             reference's int(N K) + 1 kept without ties; mergeflow's ``trim_scope: model`` rule);
             elected sign = sign(sum_t x_t), zero -> the sign of the sum of all elected signs of
             the whole model; disjoint mean (``normalize``) or sum of w_t x_t over agreeing
             entries (weights after the election, as the reference's scalar lambda).
  back       Delta = U merged (n, m): LoRA factors B' = U (n, k), A' = merged (k, m), rank <= R.

The merge is split for the engine's first pass: ``trim_thresholds`` and ``majority_sign`` are
whole-model statistics (the thresholds are exactly a ``GlobalTrim`` with kth_smallest =
N - floor(N density)); ``merge_matrix`` then needs one matrix at a time. ``merge_model`` runs all
three on an in-memory list. Departures from the reference: when the whole-model majority is
itself 0 no entry survives at a zero-mass position (the reference keeps the negative ones); the
core-space repo's ``knots`` space (merging unscaled V_t^T per layer) is not this method.
Only the horizontal stack (``concat_across_output=True``, the default) is provided.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from merging.kernels.factor_svd import Scalings, hstack_svd
from merging.kernels.sign import agreement_mask

__all__ = ["KnotsMatrix", "decompose_matrix", "majority_sign", "merge_matrix", "merge_model", "trim_thresholds"]


class KnotsMatrix(NamedTuple):
    """One matrix in KnOTS space: D_t = basis @ representations[t].

    basis U (n, k); representations X_t = diag(s) V_t^T stacked (T, k, m).
    """

    basis: torch.Tensor
    representations: torch.Tensor


def decompose_matrix(
    lora_b: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    scalings: Scalings,
    *,
    min_singular_value: float,
    dtype: torch.dtype = torch.float64,
) -> KnotsMatrix:
    """KnOTS basis and task representations of one matrix from its LoRA factors.

    Args:
        lora_b: B_t, each (n, r_t).
        lora_a: A_t, each (r_t, m).
        scalings: s_t per task.
        min_singular_value: keep triplets with s_j > this (absolute, as the reference).
        dtype: compute and output dtype.
    """
    u, s, vh_blocks = hstack_svd(lora_b, lora_a, scalings, dtype=dtype)
    k = int((s > min_singular_value).sum())
    return KnotsMatrix(u[:, :k], s[:k].reshape(1, k, 1) * vh_blocks[:, :k])  # (n, k), (T, k, m)


def trim_thresholds(representations: Sequence[torch.Tensor], densities: Sequence[float]) -> torch.Tensor:
    """Per-task magnitude threshold tau_t over every matrix of the model, shape (T,).

    tau_t is the (N - floor(N density_t))-th smallest |x| over the task's N entries; 0 (keep
    everything) when that rank is 0 (density 1).
    """
    flat = torch.cat([x.reshape(x.shape[0], -1).abs() for x in representations], dim=1)  # (T, N)
    taus = torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device)
    size = flat.shape[1]
    for t, density in enumerate(densities):
        rank = size - math.floor(size * density)
        if rank > 0:
            taus[t] = torch.kthvalue(flat[t], rank).values
    return taus


def _trimmed(representation: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    tau = thresholds.to(representation.dtype).reshape((-1,) + (1,) * (representation.dim() - 1))
    return torch.where(representation.abs() >= tau, representation, torch.zeros_like(representation))


def majority_sign(representations: Sequence[torch.Tensor], thresholds: torch.Tensor) -> torch.Tensor:
    """Sign of the sum of all elected signs of the trimmed model (a 0-dim tensor in {-1, 0, 1}):
    the fill for positions whose summed mass is exactly zero."""
    total = sum(torch.sign(_trimmed(x, thresholds).sum(dim=0)).sum() for x in representations)
    return torch.sign(torch.as_tensor(total))


def merge_matrix(
    representation: torch.Tensor,
    thresholds: torch.Tensor,
    fill_sign: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    *,
    normalize: bool,
) -> torch.Tensor:
    """One matrix's merged representation (k, m) from its stack (T, k, m) and the model's statistics.

    Args:
        representation: X_t of every task, (T, k, m), after DARE if any.
        thresholds: ``trim_thresholds`` of the model, (T,).
        fill_sign: ``majority_sign`` of the model.
        weights: w_t, applied to the agreeing entries after the election.
        normalize: disjoint mean (the reference's ``merging_type='mean'``) or disjoint sum.
    """
    trimmed = _trimmed(representation, thresholds)
    summed_sign = torch.sign(trimmed.sum(dim=0))
    sign = torch.where(summed_sign == 0, fill_sign.to(summed_sign.dtype), summed_sign)
    mask = agreement_mask(trimmed, sign)  # (T, k, m)
    w = torch.as_tensor(weights, dtype=trimmed.dtype).reshape(-1, 1, 1)
    merged = (trimmed * mask * w).sum(dim=0)
    if not normalize:
        return merged
    return merged / mask.sum(dim=0).clamp(min=1).to(merged.dtype)


def merge_model(
    representations: Sequence[torch.Tensor],
    densities: Sequence[float],
    weights: Sequence[float] | torch.Tensor,
    *,
    normalize: bool,
) -> list[torch.Tensor]:
    """KnOTS-TIES over a whole model: one merged representation (k_l, m_l) per matrix.

    Args:
        representations: per matrix l, the stack X (T, k_l, m_l) (after DARE if any).
        densities: per task, the fraction of its whole-model entries kept (1 = sign election only).
        weights: per task w_t (the reference's lambda, one value for every task).
        normalize: disjoint mean (true) or disjoint sum.

    Returns:
        Merged representations in input order; matrix l's delta is basis_l @ merged_l.
    """
    if not representations:
        return []
    thresholds = trim_thresholds(representations, densities)
    fill = majority_sign(representations, thresholds)
    return [merge_matrix(x, thresholds, fill, weights, normalize=normalize) for x in representations]
