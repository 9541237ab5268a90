"""TSV-M — Task Singular Vectors: Merge (per-task low-rank SVD, then decorrelation).

Paper: Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, CVPR 2025, "Task Singular
Vectors: Reducing Task Interference in Model Merging", arXiv 2412.00081. Follows
``../shared/specs/svd-methods.md`` §4 (checked there against FusionBench to 1e-15).

Math, per 2-D matrix (kind "matrix"), task deltas tau_t (m, n), r = min(m, n), k = floor(r / T):
    decompose  tau_t = U_t diag(s_t) V_t^T (thin SVD per task); keep the top-k triplets;
    combine    U_cat = [U_1,k | ... | U_T,k] (m, T k), s_cat, V_cat^T likewise (T k, n);
               U_perp = polar(U_cat), V_perp^T = polar(V_cat^T)  (polar(A) = P Q^T for A = P D Q^T);
               merged = U_perp diag(s_cat) V_perp^T   (singular values not rescaled).
The reference pads U_cat to r columns with zeros when T k < r; a zero column changes neither the
polar factor of the other columns nor (having s = 0) the result, so it is left out here.
Other tensors (kind "other": 1-D, embeddings, LM head): the mean over tasks.
theta = theta_0 + lambda * merged (lambda: the paper's alpha; FusionBench default 1.0, the
authors search 0.1..3.0 on validation data).
Edge cases: k = 0 (more tasks than r) or all deltas zero give a zero delta; a task of rank < k
contributes the null-space vectors its SVD returns (s = 0) to the polar step, as in the
reference. The result is invariant to SVD sign flips. No randomness, no data.
"""

from __future__ import annotations

import torch

from merging.kernels.svd import polar, thin_svd
from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class TsvMParams(MethodParams):
    """TSV-M has no parameters besides ``lambda`` (the paper's alpha)."""


def _is_matrix(group: TensorGroup) -> bool:
    return group.kind == "matrix" and group.deltas.dim() == 3


def decompose(group: TensorGroup, params: TsvMParams) -> Factors:
    """Per-task top-``floor(r / T)`` singular triplets: ``u (T, m, k)``, ``s (T, k)``, ``vh (T, k, n)``."""
    if not _is_matrix(group):
        return {"deltas": group.deltas}
    count, rows, cols = group.deltas.shape
    k = min(rows, cols) // count
    u, s, vh = thin_svd(group.deltas)  # (T, m, r), (T, r), (T, r, n)
    return {"u": u[:, :, :k].contiguous(), "s": s[:, :k].contiguous(), "vh": vh[:, :k, :].contiguous()}


def combine(group: TensorGroup, factors: Factors, params: TsvMParams) -> torch.Tensor:
    if "deltas" in factors:
        return factors["deltas"].mean(dim=0)
    u, s, vh = factors["u"], factors["s"], factors["vh"]
    count, rows, k = u.shape
    if k == 0:
        return torch.zeros_like(group.base)
    u_cat = u.permute(1, 0, 2).reshape(rows, count * k)  # (m, T k), task t in columns [t k, (t+1) k)
    vh_cat = vh.reshape(count * k, vh.shape[-1])  # (T k, n)
    return (polar(u_cat) * s.reshape(1, -1)) @ polar(vh_cat)


SPEC = MethodSpec(
    name="tsv_m",
    params=TsvMParams,
    decompose=decompose,
    combine=combine,
    paper="Gargiulo et al. 2025, Task Singular Vectors (TSV-M), arXiv 2412.00081",
)
