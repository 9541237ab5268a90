"""Iso-C and Iso-CTS — isotropic merging in the common (and task-specific) subspaces.

Paper: Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces", arXiv 2502.04959. Follows ``../shared/specs/svd-methods.md``
§5-6.

Iso-C, per 2-D matrix: M = sum_t tau_t = U diag(s) V^T; merged = mean(s) U V^T (mean over
all r = min(m, n) singular values, near-zero ones included; ||merged||_F = mean(s) sqrt(r)).
Iso-CTS, per 2-D matrix, f = common_space_fraction (0.8):
  sizes     kc = floor(r f); K = round((r - kc) / T) * T (Python's half-to-even round);
            kc = r - K; kt = K / T. If kt = 0 the matrix is merged by Iso-C; kt is capped
            at floor(r / T) (the reference's rule can give K > r, a negative kc, when kc < T / 2).
  common    U_c, s_c, V_c^T = the top-kc triplets of the SVD of M;
  specific  R_t = tau_t - U_c U_c^T tau_t; its top-kt triplets;
  merged    U_cat = [task blocks | common], s_cat, V_cat^T likewise (r slots);
            merged = mean(s_cat) polar(U_cat) polar(V_cat^T).
LoRA inputs take the factor route (``merging.kernels.factor_svd``: QR of the stacked factors,
SVD of a small core; no dense SVD). Iso-C: the SVD of the sum, and the result's span part only
(``iso_c_lora_factors``). Iso-CTS (``iso_cts_lora_factors``): the same sizes kc, kt from
r = min(m, n); the common triplets are the sum's top min(kc, rank) non-zero ones; the residual
of task t is again a LoRA product, (B_t - U_c U_c^T B_t) s_t A_t, whose top min(kt, rank)
non-zero triplets come from its factors; the polar factors of U_cat and V_cat^T are taken over
their non-zero singular values only (``partial_polar``: the tasks' residual directions may
overlap, and polar of a rank-deficient matrix adds an arbitrary basis), and the scale is the sum
of the kept singular values over all r slots (the empty slots count as zeros). The dense route
fills the slots beyond the adapters' rank (floor(r f) > T r is typical: 3276 common slots
against T r = 64 at width 4096) with arbitrary orthonormal completions, so its result there is
not unique; where every slot holds a non-zero singular value (T r >= r, distinct values) the
two routes are equal. Other tensors: mean over tasks.
theta = theta_0 + lambda * merged. Stages: decompose holds
every SVD and polar factor; combine is one product, so a lambda sweep reuses them. No data,
no randomness. ``iso_cts_subspaces`` is shared with Scale-SVD.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.kernels.factor_svd import sum_svd, task_norms
from merging.kernels.svd import partial_polar, polar
from merging.params import CoreSpaceParams, MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup

PAPER = "Marczak et al. 2025, Isotropic Model Merging (Iso-C, Iso-CTS), arXiv 2502.04959"


class IsoCParams(CoreSpaceParams):
    pass


class IsoCtsParams(MethodParams):
    common_space_fraction: float = Field(0.8, gt=0.0, le=1.0, description="Fraction f of the rank given to the common subspace.")


def subspace_sizes(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(kc, kt): common dims and per-task dims, Iso-CTS's exact rule."""
    kc = int(rank * fraction)
    # Guard: round() can ask for more task dims than the rank when kc < T / 2 (e.g. r = 3,
    # T = 2, f = 0.3: kc = 0, round(1.5) * 2 = 4 > 3, a negative kc); cap at floor(r / T).
    kt = min(round((rank - kc) / tasks), rank // tasks)
    if kt == 0:
        return rank, 0
    return rank - kt * tasks, kt


def iso_c_factors(deltas: torch.Tensor) -> Factors:
    """Iso-C's isotropic factors of a task stack (T, m, n): merged = scale * u @ vh."""
    u, s, vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
    return {"u": u, "vh": vh, "scale": s.mean().reshape(1)}


def iso_cts_factors(deltas: torch.Tensor, fraction: float) -> Factors:
    """Iso-CTS's isotropic factors of a task stack (T, m, n)."""
    t, m, n = deltas.shape
    r = min(m, n)
    kc, kt = subspace_sizes(r, t, fraction)
    if kt == 0:
        return iso_c_factors(deltas)
    u, s, vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
    u_c, s_c, vh_c = u[:, :kc], s[:kc], vh[:kc]
    residual = deltas - u_c @ (u_c.T @ deltas)  # (T, m, n): remove the common left subspace
    ru, rs, rvh = torch.linalg.svd(residual, full_matrices=False)
    u_cat = torch.cat([ru[:, :, :kt].permute(1, 0, 2).reshape(m, t * kt), u_c], dim=1)  # (m, r)
    s_cat = torch.cat([rs[:, :kt].reshape(t * kt), s_c])
    vh_cat = torch.cat([rvh[:, :kt, :].reshape(t * kt, n), vh_c], dim=0)  # (r, n)
    return {"u": polar(u_cat), "vh": polar(vh_cat), "scale": s_cat.mean().reshape(1)}


def decompose_c(group: TensorGroup, params: IsoCParams) -> Factors:
    if group.kind != "matrix":
        return {"mean": group.deltas.mean(dim=0)}
    if group.lora is not None:
        return iso_c_lora_factors(group)
    return iso_c_factors(group.deltas)


def iso_c_lora_factors(group: TensorGroup) -> Factors:
    """Iso-C of LoRA inputs from the factors (QR of the stacked factors, SVD of a (T r)-sized
    core): the same scale mean(s) over all r = min(m, n) singular values (zeros included), on
    the R directions the adapters span. The dense route adds mean(s) on r - R further null
    directions, an arbitrary completion of the basis; the factor route is the dense result's
    unique part, U_R U_R^T (dense Iso-C)."""
    t, m, n = group.deltas.shape
    u, s, vh = sum_svd(group.lora.b, group.lora.a, group.lora.scales, dtype=torch.float64)
    scale = s.sum() / min(m, n)
    dtype = group.deltas.dtype
    return {"u": u.to(dtype), "vh": vh.to(dtype), "scale": scale.to(dtype).reshape(1)}


def iso_cts_lora_factors(group: TensorGroup, fraction: float) -> Factors:
    """Iso-CTS of LoRA inputs from the factors (see the module docstring): no (m, n) SVD."""
    lora = group.lora
    bs = [b.to(torch.float64) for b in lora.b]
    as_ = [a.to(torch.float64) for a in lora.a]
    m, n, t = bs[0].shape[0], as_[0].shape[1], len(bs)
    r = min(m, n)
    kc, kt = subspace_sizes(r, t, fraction)
    if kt == 0:
        return iso_c_lora_factors(group)
    u, s, vh = sum_svd(bs, as_, lora.scales)
    kc = min(kc, s.numel())
    u_c, s_c, vh_c = u[:, :kc], s[:kc], vh[:kc]
    # a residual that is rounding noise has no triplet: cut at the scale of the inputs, not of the residual
    tol = max(m, n, sum(b.shape[1] for b in bs)) * torch.finfo(torch.float64).eps * float(
        torch.cat([s, task_norms(bs, as_, lora.scales)]).max())
    us, ss, vhs = [], [], []
    for b, a, scale in zip(bs, as_, lora.scales):
        ru, rs, rvh = sum_svd([b - u_c @ (u_c.T @ b)], [a], [scale])
        keep = min(kt, int((rs > tol).sum()))
        us.append(ru[:, :keep])
        ss.append(rs[:keep])
        vhs.append(rvh[:keep])
    u_cat, s_cat, vh_cat = torch.cat([*us, u_c], dim=1), torch.cat([*ss, s_c]), torch.cat([*vhs, vh_c], dim=0)
    dtype = group.deltas.dtype
    return {"u": partial_polar(u_cat).to(dtype), "vh": partial_polar(vh_cat).to(dtype),
            "scale": (s_cat.sum() / r).to(dtype).reshape(1)}


def decompose_cts(group: TensorGroup, params: IsoCtsParams) -> Factors:
    if group.kind != "matrix":
        return {"mean": group.deltas.mean(dim=0)}
    if group.lora is not None:
        return iso_cts_lora_factors(group, params.common_space_fraction)
    return iso_cts_factors(group.deltas, params.common_space_fraction)


def combine(group: TensorGroup, factors: Factors, params: MethodParams) -> torch.Tensor:
    if "mean" in factors:
        return factors["mean"]
    return factors["scale"] * (factors["u"] @ factors["vh"])


ISO_C_SPEC = MethodSpec(name="iso_c", params=IsoCParams, decompose=decompose_c, combine=combine, paper=PAPER,
                        param_stages={"merge_space": "decompose"})
ISO_CTS_SPEC = MethodSpec(name="iso_cts", params=IsoCtsParams, decompose=decompose_cts, combine=combine, paper=PAPER,
                          param_stages={"common_space_fraction": "decompose"})
