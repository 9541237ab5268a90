"""Decom-Renorm-Merge (DRM-H, DRM-V) — merging in a shared, renormalized SVD space.

Paper: Chaichana et al., 2025, "Decom-Renorm-Merge: Model Merging on the Right Space
Improves Multitasking", arXiv 2505.23117. Follows ``../shared/specs/drm.md`` §1-3.

Per 2-D matrix (group.kind == "matrix"), deltas D_t (n, m), coefficients c_t, drop rate rho:
  decompose  DRM-H: H = [D_1 | ... | D_T] (n, T m) = U diag(s) Vh; keep r = #{s_j > tol max s};
             split Vh_r into task blocks B_t (r, m); nu_tj = ||B_t[j, :]||, B^_t = B_t / nu_t,
             sigma_t = s nu_t, so D_t ~ U_r diag(sigma_t) B^_t.
             DRM-V: V = [D_1; ...; D_T] (T n, m) = U diag(s) Vh; split U_r into A_t (n, r);
             mu_tj = ||A_t[:, j]||, A^_t = A_t / mu_t, sigma_t = s mu_t.
  sparsify   one magnitude threshold over all T normalized blocks (keep |x| >= tau, tau the
             (N - round(N (1 - rho)))-th smallest of N entries); X_t = sigma_t * pruned block;
             TIES sign election (mass, majority fill) on X — always, as the reference.
  combine    Y_t = c_t X_t; M = disjoint mean (or plain mean) over t;
             DRM-H: Delta W = U_r M;  DRM-V: Delta W = M Vh_r.
Other tensors (1-D, embeddings, LM head): a whole-model per-model trim of rate
``non_linear_module_entries_drop_rate`` (a first pass), optional sign election
(``enable_sign_resolution``), times c_t, disjoint or plain mean.

Defaults: rho = 0.8 and horizontal (the reference CLI's), rel_rank_tol 1e-2, disjoint mean on.
Guards (``reference_compat: false``, the default): a task whose block row/column norm is at
the SVD's noise level (<= sqrt(eps) of the SVD dtype: 1.5e-8 in float64, 3.5e-4 in float32; the
rows of Vh and columns of U have unit norm) gets sigma = 0 and a zero normalized row (the
reference divides 0/0 -> NaN). Measured noise norms of a task with no support on a direction
(tasks with disjoint row supports): up to 5e-12 in float64 (512 x 1024 stack) and 4e-5 in
float32, so a 1e-12 / 32 eps cut lets such noise rows through as unit rows;
an all-zero matrix merges to zero (the reference crashes); a drop rate that prunes nothing
keeps everything (the reference crashes when k = 0). ``reference_compat: true`` reproduces the
reference: unguarded division, and rho = 0 bypasses DRM (disjoint/plain mean of the raw
deltas, no election, no coefficients; §1.6), taken in sparsify/combine so that the
decomposition never depends on the drop rate (a cached one stays valid). Keep count in both
modes is the reference's: every entry with |x| >= tau, i.e. round(N (1 - rho)) + 1 without
ties (§1.4).
The output is invariant to SVD sign conventions (a flipped singular pair flips the basis and
every block together). No randomness.

LoRA inputs (every input an adapter of the matrix): the SVD of the stack comes from QR of the
stacked factors and an SVD of a (T r)-sized core (``merging.kernels.factor_svd``, lora-core.md
§2b/c), never from the dense stack; the merged delta equals the dense route's wherever the kept
singular values are distinct and no pruning magnitude ties. Rank-1 adapters tie exactly (every
normalized row of a task is +-a_t/|a_t|), so which entries survive then depends on rounding;
a warning says so.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merging.kernels.factor_svd import drm_factors, renormalize_blocks
from merging.kernels.sign import agreement_mask, disjoint_mean, elect_sign
from merging.kernels.sparsify import trim_below
from merging.kernels.svd import relative_rank, thin_svd
from merging.params import MethodParams, ModelParams
from merging.spec import Factors, GlobalTrim, MethodSpec, TensorGroup


class DrmModelParams(ModelParams):
    coefficient: float = Field(1.0, description="c_t, applied after sign election, before the mean.")


class DrmParams(MethodParams):
    direction: Literal["horizontal", "vertical"] = Field("horizontal", description="DRM-H stacks side by side, DRM-V on top.")
    singular_matrices_drop_rate: float = Field(0.8, ge=0.0, lt=1.0, description="rho: fraction of normalized entries pruned.")
    rel_rank_tol: float = Field(1e-2, ge=0.0, lt=1.0, description="Keep singular values above this fraction of the largest.")
    enable_disjoint_mean: bool = Field(True, description="Disjoint mean (true) or plain mean over tasks.")
    enable_sign_resolution: bool = Field(True, description="Sign election on non-matrix tensors (matrices always elect).")
    non_linear_module_entries_drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Whole-model per-model trim of non-matrix deltas.")
    svd_dtype: Literal["float32", "float64"] = Field("float32", description="dtype of the SVD.")
    reference_compat: bool = Field(False, description="Reproduce the reference's unguarded arithmetic and rho = 0 bypass.")


def keep_threshold(x: torch.Tensor, drop_rate: float) -> torch.Tensor | None:
    """tau = the (N - round(N (1 - rho)))-th smallest |x| (1-based); None keeps everything."""
    n = x.numel()
    k = n - round(n * (1.0 - drop_rate))
    if drop_rate == 0 or n == 0 or k <= 0:
        return None
    return torch.kthvalue(x.reshape(-1).abs(), k).values


def _bypass(params: DrmParams) -> bool:
    return params.reference_compat and params.singular_matrices_drop_rate == 0


def decompose(group: TensorGroup, params: DrmParams) -> Factors:
    if group.kind != "matrix":
        return {"deltas": group.deltas}
    dtype = torch.float64 if params.svd_dtype == "float64" else torch.float32
    if group.lora is not None:  # LoRA inputs: the same SVD from QR of the factors (lora-core.md §2b/c)
        return drm_factors(group.lora.b, group.lora.a, group.lora.scales, direction=params.direction,
                           rel_rank_tol=params.rel_rank_tol, reference_compat=params.reference_compat, dtype=dtype)
    deltas = group.deltas  # (T, n, m)
    t, n, m = deltas.shape
    horizontal = params.direction == "horizontal"
    stacked = deltas.permute(1, 0, 2).reshape(n, t * m) if horizontal else deltas.reshape(t * n, m)
    u, s, vh = thin_svd(stacked, dtype)
    r = relative_rank(s, params.rel_rank_tol)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if horizontal:
        blocks, basis = vh.reshape(r, t, m).permute(1, 0, 2), u  # (T, r, m): B_t; (n, r)
    else:
        blocks, basis = u.reshape(t, n, r), vh  # (T, n, r): A_t; (r, m)
    normalized, sigma = renormalize_blocks(blocks, s, params.direction, reference_compat=params.reference_compat,
                                           dtype=dtype)
    return {"basis": basis, "sigma": sigma, "blocks": normalized}


def sparsify(group: TensorGroup, factors: Factors, params: DrmParams, rng: torch.Generator) -> Factors:
    if "blocks" not in factors:
        return _sparsify_other(group, factors, params)
    if _bypass(params):  # reference_compat with rho = 0: raw deltas, no SVD space (§1.6)
        return {"deltas": group.deltas}
    blocks, sigma = factors["blocks"], factors["sigma"]
    if blocks.numel() == 0:
        return {"basis": factors["basis"], "scaled": blocks}
    tau = keep_threshold(blocks, params.singular_matrices_drop_rate)
    pruned = blocks if tau is None else trim_below(blocks, tau)
    horizontal = params.direction == "horizontal"
    scaled = pruned * (sigma.unsqueeze(2) if horizontal else sigma.unsqueeze(1))  # X_t
    sign = elect_sign(scaled, tie_rule="majority")
    return {"basis": factors["basis"], "scaled": scaled * agreement_mask(scaled, sign)}


def _sparsify_other(group: TensorGroup, factors: Factors, params: DrmParams) -> Factors:
    deltas = factors["deltas"]
    if group.kind == "matrix":  # reference_compat with rho = 0: raw deltas, no election (§1.6)
        return {"deltas": deltas}
    if group.trim_thresholds is not None:
        thresholds = group.trim_thresholds.reshape((-1,) + (1,) * (deltas.dim() - 1))
        deltas = torch.where(deltas.abs() < thresholds, torch.zeros_like(deltas), deltas)
    if params.enable_sign_resolution:
        deltas = deltas * agreement_mask(deltas, elect_sign(deltas, tie_rule="majority"))
    return {"deltas": deltas}


def _mean(stack: torch.Tensor, disjoint: bool) -> torch.Tensor:
    return disjoint_mean(stack) if disjoint else stack.mean(dim=0)


def combine(group: TensorGroup, factors: Factors, params: DrmParams) -> torch.Tensor:
    coefficients = torch.tensor([p.coefficient for p in group.model_params], dtype=group.deltas.dtype, device=group.deltas.device)
    if "scaled" not in factors:
        deltas = factors["deltas"]
        if group.kind == "matrix":  # the reference's rho = 0 bypass ignores coefficients
            return _mean(deltas, params.enable_disjoint_mean)
        c = coefficients.reshape((-1,) + (1,) * (deltas.dim() - 1))
        return _mean(deltas * c, params.enable_disjoint_mean)
    scaled, basis = factors["scaled"], factors["basis"]
    if scaled.numel() == 0:
        return torch.zeros_like(group.base)
    merged = _mean(scaled * coefficients.reshape(-1, 1, 1).to(scaled.dtype), params.enable_disjoint_mean)
    delta = basis @ merged if params.direction == "horizontal" else merged @ basis
    return delta.to(group.base.dtype)


def combine_factors(group: TensorGroup, factors: Factors, params: DrmParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged delta of LoRA inputs as factors: DRM-H basis @ merged (n, r) x (r, m), DRM-V
    merged @ basis (n, r) x (r, m); the same products ``combine`` forms densely."""
    scaled, basis = factors["scaled"], factors["basis"]
    if scaled.numel() == 0:  # nothing kept: a rank-0 product
        n, m = group.base.shape
        return scaled.new_zeros(n, 0), scaled.new_zeros(0, m)
    coefficients = torch.tensor([p.coefficient for p in group.model_params], dtype=scaled.dtype, device=scaled.device)
    merged = _mean(scaled * coefficients.reshape(-1, 1, 1), params.enable_disjoint_mean)
    return (basis, merged) if params.direction == "horizontal" else (merged, basis)


def non_linear_trim(params: DrmParams) -> GlobalTrim | None:
    rate = params.non_linear_module_entries_drop_rate
    if rate == 0:
        return None
    return GlobalTrim(kinds=frozenset({"other"}), kth_smallest=lambda n, model: max(0, n - round(n * (1.0 - rate))))


SPEC = MethodSpec(
    name="drm",
    params=DrmParams,
    model_params=DrmModelParams,
    decompose=decompose,
    sparsify=sparsify,
    combine=combine,
    global_trim=non_linear_trim,
    paper="Chaichana et al. 2025, Decom-Renorm-Merge, arXiv 2505.23117",
    lora_span=True,
    combine_factors=combine_factors,
    factors_when=lambda params: not _bypass(params),
    param_stages={
        "direction": "decompose", "rel_rank_tol": "decompose", "svd_dtype": "decompose", "reference_compat": "decompose",
        "singular_matrices_drop_rate": "sparsify", "enable_sign_resolution": "sparsify",
        "non_linear_module_entries_drop_rate": "sparsify",
    },
)
