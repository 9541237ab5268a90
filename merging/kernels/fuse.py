"""Weighted fusion of sparsified task deltas (the last step of the task-arithmetic family).

With weights ``w_t`` and (optionally sign-elected) deltas ``d_t``:

* no election: ``sum_t w_t d_t``, divided by ``sum_t w_t`` when ``normalize``;
* election (TIES): keep entries agreeing with the elected sign; ``sum`` of kept weighted
  entries, divided by the summed weights of the agreeing models when ``normalize``.

``weight_before_election`` chooses mergekit's order (weights scale the deltas before the
vote, so they change which sign wins) or the TIES paper's (vote on unweighted deltas).

Every step is per position (the sums run over the T models), so large tensors are fused in
chunks of positions: the same arithmetic, in the same order, on a bounded working set (the
(T, n) weighted stack, signs and masks of a vocabulary-sized matrix are several times its
size). The TIES paper's ``majority`` rule reads a whole-tensor statistic at zero-mass positions,
so that election runs unchunked.
"""

from __future__ import annotations

import torch

from merging.kernels.sign import TieRule, agreement_mask, elect_sign

__all__ = ["fuse_deltas", "model_weights", "combine_weighted_sum", "combine_sign_elected"]

CHUNK = 1 << 20
"""Positions fused at a time (a few MB of temporaries per model). A power of two: torch's sum
over the models handles positions in blocks of a few SIMD vectors plus a scalar tail, so chunk
boundaries on that grid keep every position's order of addition, hence its bits (tested)."""


def fuse_deltas(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    elect: bool,
    normalize: bool,
    weight_before_election: bool = True,
    tie_rule: TieRule = "positive",
) -> torch.Tensor:
    """Fuse ``deltas`` ``(T, ...)`` with ``weights`` ``(T,)`` into one delta ``(...)``."""
    size = deltas[0].numel() if deltas.dim() > 1 else 0
    if size <= CHUNK or (elect and tie_rule != "positive"):
        return _fuse(deltas, weights, elect, normalize, weight_before_election, tie_rule)
    flat = deltas.reshape(deltas.shape[0], size)  # (T, n): a view of the contiguous stack
    merged = torch.empty(size, dtype=deltas.dtype, device=deltas.device)
    for start in range(0, size, CHUNK):
        merged[start:start + CHUNK] = _fuse(flat[:, start:start + CHUNK], weights, elect, normalize,
                                            weight_before_election, tie_rule)
    return merged.reshape(deltas.shape[1:])


def _fuse(deltas: torch.Tensor, weights: torch.Tensor, elect: bool, normalize: bool, weight_before_election: bool,
          tie_rule: TieRule) -> torch.Tensor:
    w = weights.to(deltas.dtype).reshape((-1,) + (1,) * (deltas.dim() - 1))  # (T, 1, ...)
    weighted = deltas * w
    if not elect:
        merged = weighted.sum(dim=0)
        if normalize:
            divisor = w.sum(dim=0)
            divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
            merged = merged / divisor
        return merged
    sign = elect_sign(weighted if weight_before_election else deltas, tie_rule=tie_rule)
    mask = agreement_mask(weighted if weight_before_election else deltas, sign)
    merged = (weighted * mask).sum(dim=0)
    if normalize:
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        merged = merged / divisor
    return merged


def model_weights(group) -> torch.Tensor:
    """The per-model ``weight`` of a tensor group's resolved model params, shape ``(T,)``."""
    return torch.tensor([p.weight for p in group.model_params], dtype=torch.float64)  # exact; cast by the caller


def combine_weighted_sum(group, factors, params) -> torch.Tensor:
    """Stage ``combine`` of the task-arithmetic family without election: sum_t w_t d_t
    (divided by sum_t w_t when ``params.normalize``)."""
    return fuse_deltas(factors["deltas"], model_weights(group), elect=False, normalize=params.normalize)


def combine_sign_elected(group, factors, params) -> torch.Tensor:
    """Stage ``combine`` of the TIES family: sign election, then the (normalized) sum of the
    agreeing weighted entries, with the method's election conventions."""
    return fuse_deltas(factors["deltas"], model_weights(group), elect=True, normalize=params.normalize,
                       weight_before_election=params.weight_before_election, tie_rule=params.sign_tie_rule)
