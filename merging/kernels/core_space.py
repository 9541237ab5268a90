"""Core Space merging of LoRA adapters: merge small cores in a shared basis, map back as factors.

Paper: Panariello et al., NeurIPS 2025, "Accurate and Efficient Low-Rank Model Merging in Core
Space", arXiv 2509.17786 (code ``apanariello4/core-space-merging``). Follows
``../shared/specs/lora-core.md`` §3. Per LoRA-targeted matrix, T tasks D_t = s_t B_t A_t, in float64:

  bases  U_ref = left singular vectors of B_cat = [B_1 | ... | B_T] (n, p), p = min(n, R);
         V_ref = right singular vectors of A_cat = [A_1; ...; A_T] (m, q), q = min(m, R);
         from the RAW factors (no s_t), every column kept (the reference's rule), each column's
         largest-|.| entry made positive (first index on ties). Other sign conventions flip
         rows / columns of every core together; no merge below depends on them.
  cores  M_t = s_t U_ref^T B_t A_t V_ref (p, q): lossless, U_ref M_t V_ref^T = D_t (s_t inside
         M_t keeps task arithmetic exact for alpha != r).
  merge  on the stack (T, p, q): task arithmetic (weighted sum), TIES (mergeflow's rule: exactly
         max(1, floor(density p q)) entries kept per core, ties by index; the reference keeps
         int(density p q) + 1), DARE (Bernoulli keep, one draw per task in order from the
         generator handed in), TSV-M (k = floor(min(p, q) / T) triplets per task, polar factors),
         Iso-C (``isotropize_core``: mean of ALL min(p, q) singular values times P Q^T).
  back   Delta = U_ref M V_ref^T, returned as LoRA factors B' = U_ref M (n, q), A' = V_ref^T
         (q, m), rank <= R, or balanced (B' = U_ref P sqrt(S), A' = sqrt(S) Q^T V_ref^T, zero
         singular values dropped). ``lambda`` is the caller's, as everywhere in mergeflow.

Exactness (lora-core.md §6): task arithmetic equals full-space task arithmetic to rounding;
TSV-M and Iso-C equal full-space runs restricted to span(U_ref) x span(V_ref); TIES and DARE act
per entry in this basis and differ from full space by construction. The basis is gauge
dependent (B G, G^-1 A rotates U_ref, V_ref within the same spans but leaves D_t unchanged), so
TIES and DARE depend on the factors' gauge; task arithmetic, TSV-M and Iso-C, being
orthogonally covariant, do not (for full-rank B_cat and A_cat; see null directions below).

Null directions. When B_cat (or A_cat) is rank-deficient (tasks sharing a direction, an all-zero
adapter), U_ref's last columns are an arbitrary completion; cores are zero there, so task
arithmetic, TIES, DARE and TSV-M do not depend on that completion (the TIES budget p q still
counts its entries), but Iso-C lifts those directions to the mean singular value.
``basis_rtol`` drops basis columns with singular value <= basis_rtol * max (off by default, as
the reference); then Iso-C flattens the spectrum over the adapters' span only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from merging.kernels.factor_svd import Scalings, as_lora_factors
from merging.kernels.fuse import fuse_deltas
from merging.kernels.rescale import Rescale, apply_rescale
from merging.kernels.sign import TieRule
from merging.kernels.sparsify import keep_topk
from merging.kernels.svd import polar, thin_svd
from merging.rng import uniform

__all__ = [
    "CoreSpace",
    "densify",
    "drop_and_rescale",
    "factors_from_core",
    "isotropize_core",
    "project_to_core",
    "reference_bases",
    "task_arithmetic_cores",
    "ties_cores",
    "dare_cores",
    "trim_cores",
    "tsv_cores",
]


class CoreSpace(NamedTuple):
    """Shared bases and per-task cores: D_t = u_ref @ cores[t] @ v_ref.T.

    u_ref (n, p), v_ref (m, q), cores (T, p, q); p = min(n, R), q = min(m, R) unless
    ``basis_rtol`` dropped null columns.
    """

    u_ref: torch.Tensor
    v_ref: torch.Tensor
    cores: torch.Tensor


def _positive_peaks(basis: torch.Tensor) -> torch.Tensor:
    """Flip columns so that each one's largest-|.| entry (first on ties) is positive."""
    if basis.numel() == 0:
        return basis
    peak = basis.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(basis.gather(0, peak.unsqueeze(0)))  # (1, k)
    return basis * torch.where(signs == 0, torch.ones_like(signs), signs)


def _kept_columns(s: torch.Tensor, rtol: float | None) -> int:
    if rtol is None or s.numel() == 0:
        return s.numel()
    return int((s > rtol * s.max()).sum())


def reference_bases(
    lora_b: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    *,
    basis_rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_ref (n, p), V_ref (m, q))`` from the raw factors, sign-canonical (module docstring).

    Args:
        lora_b: B_t, each (n, r_t).
        lora_a: A_t, each (r_t, m).
        basis_rtol: drop columns with singular value <= basis_rtol * max; None keeps all.
        dtype: compute and output dtype.
    """
    u_b, s_b, _ = thin_svd(torch.cat([b.to(dtype) for b in lora_b], dim=1), dtype)  # B_cat (n, R)
    _, s_a, vh_a = thin_svd(torch.cat([a.to(dtype) for a in lora_a], dim=0), dtype)  # A_cat (R, m)
    u_ref = u_b[:, : _kept_columns(s_b, basis_rtol)]
    v_ref = vh_a[: _kept_columns(s_a, basis_rtol)].T
    return _positive_peaks(u_ref), _positive_peaks(v_ref)


def project_to_core(
    lora_b: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    scalings: Scalings,
    *,
    basis_rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> CoreSpace:
    """Bases and cores M_t = s_t U_ref^T B_t A_t V_ref of T LoRA tasks (never an (n, m) matrix).

    Args:
        lora_b, lora_a: the tasks' factors, B_t (n, r_t), A_t (r_t, m); ranks may differ.
        scalings: s_t per task.
        basis_rtol, dtype: as ``reference_bases``.

    Raises:
        ValueError: the factor lists or shapes do not line up.
    """
    bs, as_, scales = as_lora_factors(lora_b, lora_a, scalings, dtype)
    u_ref, v_ref = reference_bases(bs, as_, basis_rtol=basis_rtol, dtype=dtype)
    cores = [s * (u_ref.T @ b) @ (a @ v_ref) for s, b, a in zip(scales, bs, as_)]
    return CoreSpace(u_ref, v_ref, torch.stack(cores))  # (T, p, q)


def task_arithmetic_cores(
    cores: torch.Tensor, weights: Sequence[float] | torch.Tensor, *, normalize: bool
) -> torch.Tensor:
    """``sum_t w_t M_t`` (divided by ``sum_t w_t`` when ``normalize``), shape (p, q)."""
    return fuse_deltas(cores, torch.as_tensor(weights, dtype=cores.dtype), elect=False, normalize=normalize)


def trim_cores(cores: torch.Tensor, densities: Sequence[float]) -> torch.Tensor:
    """Keep exactly max(1, floor(density_t p q)) largest-|.| entries of each core (ties by index);
    density >= 1 keeps the core whole. mergeflow's per-tensor TIES trim."""
    trimmed = torch.empty_like(cores)
    for t, density in enumerate(densities):
        size = cores[t].numel()
        trimmed[t] = cores[t] if density >= 1 else keep_topk(cores[t], max(1, math.floor(density * size)))
    return trimmed


def ties_cores(
    cores: torch.Tensor,
    densities: Sequence[float],
    weights: Sequence[float] | torch.Tensor,
    *,
    normalize: bool,
    weight_before_election: bool,
    tie_rule: TieRule,
) -> torch.Tensor:
    """TIES in core space: ``trim_cores``, sign election, disjoint mean (``normalize``) or sum.

    The election conventions are mergeflow's TIES parameters (``merging/methods/ties.py``); the
    reference's are ``weight_before_election=False, tie_rule="majority"``.
    """
    return fuse_deltas(
        trim_cores(cores, densities),
        torch.as_tensor(weights, dtype=cores.dtype),
        elect=True,
        normalize=normalize,
        weight_before_election=weight_before_election,
        tie_rule=tie_rule,
    )


def drop_and_rescale(
    stack: torch.Tensor, densities: Sequence[float], generator: torch.Generator, rescale: Rescale
) -> torch.Tensor:
    """DARE on a task stack (T, ...): keep each entry with probability density_t, rescale.

    One uniform draw of ``stack[t].shape`` per task with density < 1, in task order, from
    ``generator`` (as ``merging/methods/dare.py``); ``rescale="inverse"`` is the papers'
    division by density (the Core Space and KnOTS references use it).
    """
    out = torch.empty_like(stack)
    for t, density in enumerate(densities):
        if density >= 1:
            out[t] = stack[t]
            continue
        keep = uniform(stack[t].shape, generator, stack[t]) < density
        out[t] = apply_rescale(stack[t], keep, density, rescale)
    return out


def dare_cores(
    cores: torch.Tensor,
    densities: Sequence[float],
    weights: Sequence[float] | torch.Tensor,
    generator: torch.Generator,
    *,
    rescale: Rescale,
    elect: bool,
    normalize: bool,
    weight_before_election: bool = True,
    tie_rule: TieRule = "positive",
) -> torch.Tensor:
    """DARE in core space: ``drop_and_rescale`` then a weighted sum (``dare_linear``) or, with
    ``elect``, sign election and disjoint fuse (mergeflow's ``dare_ties``; the reference's
    ``dare-ties`` also trims: compose ``drop_and_rescale`` with ``ties_cores``)."""
    dropped = drop_and_rescale(cores, densities, generator, rescale)
    return fuse_deltas(
        dropped,
        torch.as_tensor(weights, dtype=cores.dtype),
        elect=elect,
        normalize=normalize,
        weight_before_election=weight_before_election,
        tie_rule=tie_rule,
    )


def tsv_cores(cores: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
    """TSV-M in core space: the top k = floor(min(p, q) / T) triplets of each core in slots of
    U_cat (p, T k), s_cat, V_cat^T (T k, q); merged = polar(U_cat) diag(s_cat) polar(V_cat^T).

    A task of rank < k (ranks differ) would fill its slots with null triplets whose vectors are
    arbitrary; triplets with s <= rtol * max_t (default max(p, q) * eps) are zeroed instead
    (an empty slot changes nothing). k = 0 (T > min(p, q)) falls back to the mean, as tsv_m.
    """
    t_count, p, q = cores.shape
    k = min(p, q) // t_count
    if k == 0:
        return cores.mean(dim=0)
    u, s, vh = thin_svd(cores)  # (T, p, r), (T, r), (T, r, q)
    tol = (max(p, q) * torch.finfo(cores.dtype).eps if rtol is None else rtol) * s[:, :1]  # (T, 1)
    s_top = torch.where(s[:, :k] > tol, s[:, :k], torch.zeros_like(s[:, :k]))
    live = (s_top > 0).to(cores.dtype)  # (T, k)
    u_cat = (u[:, :, :k] * live.unsqueeze(1)).permute(1, 0, 2).reshape(p, t_count * k)  # (p, T k)
    vh_cat = (vh[:, :k, :] * live.unsqueeze(2)).reshape(t_count * k, q)  # (T k, q)
    return (polar(u_cat) * s_top.reshape(-1)) @ polar(vh_cat)


def isotropize_core(core: torch.Tensor) -> torch.Tensor:
    """Iso-C's flattening of a merged core (p, q): mean(sigma) P Q^T over all min(p, q) singular
    values (zeros included, as the reference). Iso-C in core space = isotropize(sum of cores)."""
    u, s, vh = thin_svd(core)
    if s.numel() == 0:
        return core
    return s.mean() * (u @ vh)


def factors_from_core(
    space: CoreSpace, core: torch.Tensor, *, balanced: bool = False, rtol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(B', A')`` with B' A' = U_ref core V_ref^T (scale 1: alpha = rank).

    Args:
        space: the bases the core lives in.
        core: a merged core (p, q).
        balanced: False gives B' = U_ref core (n, q), A' = V_ref^T (q, m); True splits
            svd(core) = P S Q^T as B' = U_ref P sqrt(S), A' = sqrt(S) Q^T V_ref^T and drops
            singular values <= rtol * max (default max(p, q) * eps): rank = the core's rank.
        rtol: see ``balanced``.
    """
    if not balanced:
        return space.u_ref @ core, space.v_ref.T
    p_vecs, s, qh = thin_svd(core)
    keep = (
        0
        if s.numel() == 0
        else int((s > (max(core.shape) * torch.finfo(core.dtype).eps if rtol is None else rtol) * s.max()).sum())
    )
    root = s[:keep].sqrt()
    return (space.u_ref @ p_vecs[:, :keep]) * root, root.unsqueeze(1) * (qh[:keep] @ space.v_ref.T)


def densify(lora_b: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """The dense delta ``B @ A`` (n, m) of one pair of factors."""
    return lora_b @ lora_a
