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

from collections.abc import Callable

import torch

from merging.kernels.sign import TieRule, agreement_mask, elect_sign

__all__ = ["fuse_deltas", "by_positions", "model_weights", "combine_weighted_sum", "combine_sign_elected"]

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
    def fuse(stack: torch.Tensor) -> torch.Tensor:
        return _fuse(stack, weights, elect, normalize, weight_before_election, tie_rule)

    if elect and tie_rule != "positive":
        return fuse(deltas)
    return by_positions(fuse, deltas)


def by_positions(fn: Callable[..., torch.Tensor], stack: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """``fn(stack, *others)`` for a per-position ``fn`` (element-wise, plus sums over the models):
    ``stack`` ``(T, ...)``, ``others`` shaped like ``stack[0]``, result shaped like ``stack[0]``;
    computed ``CHUNK`` positions at a time (2-D / 1-D chunks) when the tensor is larger."""
    size = stack[0].numel() if stack.dim() > 1 else 0
    if size <= CHUNK:
        return fn(stack, *others)
    flat = stack.reshape(stack.shape[0], size)  # (T, n): a view of a contiguous stack
    flat_others = [o.reshape(size) for o in others]
    out = None
    for start in range(0, size, CHUNK):
        part = fn(flat[:, start:start + CHUNK], *(o[start:start + CHUNK] for o in flat_others))
        if out is None:
            out = torch.empty(size, dtype=part.dtype, device=part.device)
        out[start:start + part.numel()] = part
    return out.reshape(stack.shape[1:])


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
    voters = weighted if weight_before_election else deltas
    sign = elect_sign(voters, tie_rule=tie_rule)
    if tie_rule == "positive":  # the elected sign is never 0: agreeing is a positive product (zeros never agree)
        mask = voters * sign > 0
    else:
        mask = agreement_mask(voters, sign)
    merged = (weighted * mask).sum(dim=0)
    if normalize:
        divisor = (w * mask).sum(dim=0)
        divisor.masked_fill_(divisor == 0, 1.0)
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
