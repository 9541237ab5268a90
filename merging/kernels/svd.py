"""SVD kernels shared by the SVD-space methods (DRM, TSV-M, Iso-C / Iso-CTS, Scale-SVD).

* ``thin_svd``: ``A = U diag(s) Vh`` with ``full_matrices=False``, batched over leading dims,
  computed in float32 or float64 (torch has no half-precision SVD);
* ``relative_rank``: ``r = #{j : s_j > tol * max(s)}`` (strict ``>``; 0 for an all-zero spectrum);
* ``polar``: the orthogonal polar factor ``P Q^T`` of ``A = P D Q^T`` (the nearest matrix with
  orthonormal columns, or rows for a wide ``A``; ``../shared/specs/svd-methods.md`` §0).

Functions are pure and return tensors in the dtype they computed in; callers cast once. They
call ``torch.linalg.svd`` at call time, so a test can count SVDs by patching it.
"""

from __future__ import annotations

import torch

__all__ = ["partial_polar", "polar", "relative_rank", "thin_svd"]


def thin_svd(matrix: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``matrix`` ``(..., m, n)``.

    Args:
        matrix: one matrix or a batch of them.
        dtype: float32 or float64 to compute in; default the input's dtype, or float32 for
            half-precision inputs.

    Returns:
        ``(U, s, Vh)`` with shapes ``(..., m, p)``, ``(..., p)``, ``(..., p, n)``, ``p = min(m, n)``,
        ``s`` descending, in the compute dtype.
    """
    if dtype is None:
        dtype = matrix.dtype if matrix.dtype in (torch.float32, torch.float64) else torch.float32
    try:
        return torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    except torch.linalg.LinAlgError:
        # divide and conquer (gesdd, torch's CPU driver) can fail to converge on matrices with
        # many repeated or zero singular values (e.g. Iso-CTS's stacked bases); QR iteration
        # (gesvd) in float64 is slower but converges
        u, s, vh = _gesvd(matrix.to(torch.float64))
        return u.to(dtype), s.to(dtype), vh.to(dtype)


def _gesvd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if matrix.is_cuda:
        return torch.linalg.svd(matrix, full_matrices=False, driver="gesvd")
    import numpy as np
    from scipy.linalg import svd

    flat = matrix.reshape(-1, *matrix.shape[-2:]).numpy()
    parts = [svd(m, full_matrices=False, lapack_driver="gesvd") for m in flat]
    u, s, vh = (torch.from_numpy(np.stack([p[i] for p in parts])) for i in range(3))
    lead = matrix.shape[:-2]
    return u.reshape(*lead, *u.shape[-2:]), s.reshape(*lead, s.shape[-1]), vh.reshape(*lead, *vh.shape[-2:])


def relative_rank(singular_values: torch.Tensor, rel_tol: float) -> int:
    """Number of singular values strictly above ``rel_tol * max(s)`` (0 if all are zero)."""
    if singular_values.numel() == 0:
        return 0
    return int((singular_values > rel_tol * singular_values.max()).sum())


def partial_polar(matrix: torch.Tensor) -> torch.Tensor:
    """``P_k Q_k^T`` over the non-zero singular values of ``matrix`` only (the partial isometry
    of its polar decomposition; unique, unlike ``polar`` of a rank-deficient matrix, which
    adds an arbitrary null-space basis). Equals ``polar`` for a full-rank matrix. A singular
    value counts as zero below max(shape) * eps(dtype) * the largest one."""
    u, s, vh = thin_svd(matrix)
    k = int((s > max(matrix.shape) * torch.finfo(s.dtype).eps * s.max()).sum()) if s.numel() else 0
    return (u[:, :k] @ vh[:k]).to(matrix.dtype)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``matrix = P D Q^T`` (thin SVD), same shape and dtype.

    For a full-rank tall matrix it equals ``A (A^T A)^(-1/2)``; where ``A`` is rank-deficient the
    factor includes the null-space basis the SVD returns (as in the reference implementations).
    """
    u, _, vh = thin_svd(matrix)
    return (u @ vh).to(matrix.dtype)
