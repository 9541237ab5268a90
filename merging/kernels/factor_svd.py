"""Exact thin SVDs of sums and stacks of LoRA products, from the factors alone.

Follows ``../shared/specs/lora-core.md`` §2 (the sum is resize_lora's ``fast_decompose``; the
stacks are DRM-H / KnOTS and DRM-V of ``../shared/specs/drm.md``). Task t contributes
D_t = s_t B_t A_t with B_t (n, r_t), A_t (r_t, m); ranks may differ, R = sum_t r_t;
B_cat = [B_1 | ... | B_T] (n, R), A_cat = [A_1; ...; A_T] (R, m). No (n, m) matrix is formed.

  sum     S = sum_t D_t = B_cat A^s_cat, A^s_cat = [s_1 A_1; ...]. qr(B_cat) = Q_B R_B,
          qr(A^s_cat^T) = Q_A R_A, K = R_B R_A^T, svd(K) = U_K diag(sigma) V_K^T;
          S = (Q_B U_K) diag(sigma) (Q_A V_K)^T.
  hstack  H = [D_1 | ... | D_T] (n, T m) = B_cat blockdiag(s_t A_t). qr((s_t A_t)^T) = Q_t R_t,
          K = R_B blockdiag(R_t)^T; U = Q_B U_K; task block t of V^T = V_K^T[:, cols t] Q_t^T.
  vstack  V = [D_1; ...; D_T] (T n, m) = blockdiag(s_t B_t) A_cat. qr(A_cat^T) = Q_A R_A,
          qr(s_t B_t) = Q_t R_t, K = blockdiag(R_t) R_A^T; V^T = V_K^T Q_A^T;
          row block t of U = Q_t U_K[rows t, :].
Reduced QR of an (n, R) matrix with R > n has n columns, so K is rectangular when R > n or
R > m; nothing else changes. Cost O((n + m) R^2 + R^3) instead of a dense SVD's O(n m min(n, m)).

Null directions. A dense SVD of the formed matrix returns min(rows, cols) triplets; those past
its rank carry arbitrary orthonormal completions (LAPACK-dependent). The factor route has at
most min(rows, cols, R) triplets and its null ones are different arbitrary vectors, so every
function here returns only the numerically non-zero triplets: sigma_j > tol with
tol = rtol * max(sigma_1, max_t ||D_t||_F), rtol = max(rows, cols, R) * eps(dtype) by default
(numpy's ``matrix_rank`` rule, with the largest task norm as a floor so that a sum that cancels
to rounding noise has rank 0, not a handful of noise triplets). Kept triplets equal the dense
ones: singular values to rounding, each pair with a distinct non-zero value up to a joint sign
flip, repeated values up to a rotation of their subspace. An all-zero input gives zero triplets.

``drm_factors`` is DRM's ``decompose`` (``merging/methods/drm.py``) for LoRA inputs: the same dict
(``basis``, ``sigma``, ``blocks``) and renormalisation guard, from ``hstack_svd`` / ``vstack_svd``.
The DRM claim of lora-core.md §2 holds: with rank >= 2 adapters and distinct kept singular
values the merged delta equals the dense route's up to rounding; with rank-1 adapters every
normalized row of a task block is +-a_t / |a_t|, pruning magnitudes tie exactly and the two
routes may keep different entries, so ``drm_factors`` logs a warning.

Functions are pure, compute in ``dtype`` (float64 unless told) and return that dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from merging.kernels.svd import relative_rank, thin_svd

__all__ = [
    "HStackSVD",
    "ThinSVD",
    "Scalings",
    "VStackSVD",
    "as_lora_factors",
    "drm_factors",
    "hstack_svd",
    "renormalize_blocks",
    "sum_svd",
    "task_norms",
    "vstack_svd",
]

logger = logging.getLogger(__name__)

Scalings = Sequence[float] | torch.Tensor


class ThinSVD(NamedTuple):
    """``matrix = u diag(s) vh``: u (n, k), s (k,) descending, vh (k, m)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


class HStackSVD(NamedTuple):
    """``[D_1 | ... | D_T] = u diag(s) [vh_1 | ... | vh_T]``: u (n, k), s (k,), vh_blocks (T, k, m)."""

    u: torch.Tensor
    s: torch.Tensor
    vh_blocks: torch.Tensor


class VStackSVD(NamedTuple):
    """``[D_1; ...; D_T] = [u_1; ...; u_T] diag(s) vh``: u_blocks (T, n, k), s (k,), vh (k, m)."""

    u_blocks: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def as_lora_factors(
    lora_b: Sequence[torch.Tensor], lora_a: Sequence[torch.Tensor], scalings: Scalings, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Factors in ``dtype`` and scalings as a (T,) tensor.

    Raises:
        ValueError: no task, counts differ, or a pair is not an (n, r_t) x (r_t, m) product of
            task 0's (n, m) with r_t >= 1; the message names the task and the shapes.
    """
    scales = torch.as_tensor(scalings, dtype=dtype).reshape(-1)
    if not len(lora_b) == len(lora_a) == scales.numel() or len(lora_b) == 0:
        raise ValueError(
            f"need one B, one A and one scaling per task, got {len(lora_b)} B, {len(lora_a)} A, "
            f"{scales.numel()} scalings"
        )
    n, m = lora_b[0].shape[0], lora_a[0].shape[-1]
    for t, (b, a) in enumerate(zip(lora_b, lora_a)):
        if (
            b.dim() != 2
            or a.dim() != 2
            or b.shape[0] != n
            or a.shape[1] != m
            or b.shape[1] != a.shape[0]
            or a.shape[0] == 0
        ):
            raise ValueError(
                f"task {t}: B {tuple(b.shape)} and A {tuple(a.shape)} do not form an ({n}, {m}) LoRA "
                f"product of rank >= 1 (B must be (n, r), A (r, m), as task 0's)"
            )
    return [b.to(dtype) for b in lora_b], [a.to(dtype) for a in lora_a], scales


def task_norms(
    lora_b: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    scalings: Scalings,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``||s_t B_t A_t||_F`` per task, shape (T,), from the (r_t, r_t) Gram matrices only."""
    return _task_norms(*as_lora_factors(lora_b, lora_a, scalings, dtype))


def _task_norms(bs: list[torch.Tensor], as_: list[torch.Tensor], scales: torch.Tensor) -> torch.Tensor:
    squared = [((b.T @ b) * (a @ a.T)).sum().clamp(min=0) for b, a in zip(bs, as_)]  # tr(B^T B A A^T)
    return scales.abs() * torch.stack(squared).sqrt()


def _nonzero_count(
    s: torch.Tensor, rows: int, cols: int, rank_bound: int, floor: torch.Tensor, rtol: float | None, dtype: torch.dtype
) -> int:
    if s.numel() == 0:
        return 0
    if rtol is None:
        rtol = max(rows, cols, rank_bound) * torch.finfo(dtype).eps
    return int((s > rtol * torch.maximum(s.max(), floor)).sum())


def sum_svd(
    lora_b: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    scalings: Scalings,
    *,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> ThinSVD:
    """Thin SVD of ``sum_t s_t B_t A_t`` (n, m), its non-zero triplets only (see the module docstring).

    Args:
        lora_b: B_t, each (n, r_t).
        lora_a: A_t, each (r_t, m).
        scalings: s_t (alpha_t / r_t, or alpha_t / sqrt(r_t) for rsLoRA).
        rtol: relative cut for null triplets; default max(n, m, R) * eps(dtype).
        dtype: compute and output dtype.

    Returns:
        ``ThinSVD(u (n, k), s (k,), vh (k, m))``, k <= min(n, m, R).
    """
    bs, as_, scales = as_lora_factors(lora_b, lora_a, scalings, dtype)
    b_cat = torch.cat(bs, dim=1)  # (n, R)
    a_scaled = torch.cat([s * a for s, a in zip(scales, as_)], dim=0)  # (R, m)
    q_b, r_b = torch.linalg.qr(b_cat)  # (n, p_b), (p_b, R)
    q_a, r_a = torch.linalg.qr(a_scaled.T)  # (m, p_a), (p_a, R)
    u_k, s, vh_k = thin_svd(r_b @ r_a.T, dtype)  # core (p_b, p_a)
    n, m, rank_bound = b_cat.shape[0], a_scaled.shape[1], b_cat.shape[1]
    k = _nonzero_count(s, n, m, rank_bound, _task_norms(bs, as_, scales).max(), rtol, dtype)
    return ThinSVD(q_b @ u_k[:, :k], s[:k], vh_k[:k] @ q_a.T)


def hstack_svd(
    lora_b: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    scalings: Scalings,
    *,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> HStackSVD:
    """Thin SVD of ``[D_1 | ... | D_T]`` (n, T m), D_t = s_t B_t A_t; non-zero triplets only.

    Args: as ``sum_svd``.

    Returns:
        ``HStackSVD(u (n, k), s (k,), vh_blocks (T, k, m))``: block t is the columns of task t in V^T.
    """
    bs, as_, scales = as_lora_factors(lora_b, lora_a, scalings, dtype)
    b_cat = torch.cat(bs, dim=1)  # (n, R)
    q_b, r_b = torch.linalg.qr(b_cat)  # (n, p_b), (p_b, R)
    per_task = [torch.linalg.qr((s * a).T) for s, a in zip(scales, as_)]  # Q_t (m, p_t), R_t (p_t, r_t)
    core = r_b @ torch.block_diag(*[r for _, r in per_task]).T  # (p_b, P), P = sum_t p_t
    u_k, s, vh_k = thin_svd(core, dtype)
    n, m, t_count = b_cat.shape[0], as_[0].shape[1], len(as_)
    k = _nonzero_count(s, n, t_count * m, b_cat.shape[1], _task_norms(bs, as_, scales).max(), rtol, dtype)
    widths = [q.shape[1] for q, _ in per_task]
    blocks = [vh_core @ q.T for vh_core, (q, _) in zip(vh_k[:k].split(widths, dim=1), per_task)]  # (k, m) each
    return HStackSVD(q_b @ u_k[:, :k], s[:k], torch.stack(blocks))


def vstack_svd(
    lora_b: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    scalings: Scalings,
    *,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> VStackSVD:
    """Thin SVD of ``[D_1; ...; D_T]`` (T n, m), D_t = s_t B_t A_t; non-zero triplets only.

    Args: as ``sum_svd``.

    Returns:
        ``VStackSVD(u_blocks (T, n, k), s (k,), vh (k, m))``: block t is the rows of task t in U.
    """
    bs, as_, scales = as_lora_factors(lora_b, lora_a, scalings, dtype)
    a_cat = torch.cat(as_, dim=0)  # (R, m)
    q_a, r_a = torch.linalg.qr(a_cat.T)  # (m, p_a), (p_a, R)
    per_task = [torch.linalg.qr(s * b) for s, b in zip(scales, bs)]  # Q_t (n, p_t), R_t (p_t, r_t)
    core = torch.block_diag(*[r for _, r in per_task]) @ r_a.T  # (P, p_a)
    u_k, s, vh_k = thin_svd(core, dtype)
    n, m, t_count = bs[0].shape[0], a_cat.shape[1], len(bs)
    k = _nonzero_count(s, t_count * n, m, a_cat.shape[0], _task_norms(bs, as_, scales).max(), rtol, dtype)
    heights = [q.shape[1] for q, _ in per_task]
    blocks = [q @ u_core for u_core, (q, _) in zip(u_k[:, :k].split(heights, dim=0), per_task)]  # (n, k) each
    return VStackSVD(torch.stack(blocks), s[:k], vh_k[:k] @ q_a.T)


def renormalize_blocks(
    blocks: torch.Tensor,
    s: torch.Tensor,
    direction: Literal["horizontal", "vertical"],
    *,
    reference_compat: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRM's renormalisation of task blocks of unit-norm singular vectors (drm.md §1).

    Args:
        blocks: horizontal: the task blocks of V^T (T, r, m), rows renormalised; vertical: the
            task blocks of U (T, n, r), columns renormalised.
        s: the kept singular values (r,).
        direction: which stack the blocks come from.
        reference_compat: divide unguarded (0/0 = NaN, as the reference); otherwise a block
            row/column with norm <= sqrt(eps(dtype)) is SVD noise and gets sigma 0 and zeros.
        dtype: the SVD's dtype (sets the noise level).

    Returns:
        ``(normalized blocks, sigma (T, r))`` with D_t ~ basis-side factor x diag(sigma_t) x block.
    """
    horizontal = direction == "horizontal"
    norms = blocks.norm(dim=2 if horizontal else 1)  # (T, r)
    if reference_compat:
        safe = norms
    else:
        tiny = norms <= torch.finfo(dtype).eps ** 0.5
        safe = torch.where(tiny, torch.ones_like(norms), norms)
    normalized = blocks / (safe.unsqueeze(2) if horizontal else safe.unsqueeze(1))
    sigma = s.unsqueeze(0) * norms
    if not reference_compat:
        keep = (~tiny).to(normalized.dtype)
        normalized = normalized * (keep.unsqueeze(2) if horizontal else keep.unsqueeze(1))
        sigma = sigma * keep
    return normalized, sigma


def drm_factors(
    lora_b: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    scalings: Scalings,
    *,
    direction: Literal["horizontal", "vertical"],
    rel_rank_tol: float,
    reference_compat: bool = False,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """DRM's decomposition of one LoRA-targeted matrix, as ``merging.methods.drm.decompose``.

    Args:
        lora_b, lora_a, scalings: the tasks' factors (see ``sum_svd``).
        direction: DRM-H (``"horizontal"``) or DRM-V (``"vertical"``).
        rel_rank_tol: keep singular values > rel_rank_tol * max (DRM's ``rel_rank_tol``).
        reference_compat: DRM's unguarded renormalisation.
        dtype: the SVD dtype (DRM's ``svd_dtype``).

    Returns:
        ``{"basis": U_r (n, r) | V^T_r (r, m), "sigma": (T, r), "blocks": (T, r, m) | (T, n, r)}``,
        the keys and shapes of the dense ``decompose``; equal to it up to SVD sign flips.
    """
    ranks = [a.shape[0] for a in lora_a]
    if min(ranks) == 1:
        logger.warning(
            "DRM of rank-1 LoRA inputs (ranks %s): normalized blocks tie exactly in magnitude, so which "
            "entries survive pruning depends on rounding (lora-core.md §2)",
            ranks,
        )
    if direction == "horizontal":
        u, s, blocks = hstack_svd(lora_b, lora_a, scalings, dtype=dtype)
        r = relative_rank(s, rel_rank_tol)
        basis, blocks = u[:, :r], blocks[:, :r]  # (n, r), (T, r, m)
    else:
        blocks, s, vh = vstack_svd(lora_b, lora_a, scalings, dtype=dtype)
        r = relative_rank(s, rel_rank_tol)
        basis, blocks = vh[:r], blocks[:, :, :r]  # (r, m), (T, n, r)
    normalized, sigma = renormalize_blocks(blocks, s[:r], direction, reference_compat=reference_compat, dtype=dtype)
    return {"basis": basis, "sigma": sigma, "blocks": normalized}
