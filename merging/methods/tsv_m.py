"""TSV-M — Task Singular Vectors: Merge.

Paper: Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
Model Merging", arXiv 2412.00081. Follows ``../shared/specs/svd-methods.md`` §4.

Per 2-D matrix (m, n), r = min(m, n), T tasks, k = floor(r / T):
  decompose  tau_t = U_t diag(s_t) V_t^T (thin SVD); keep the top-k triplets of each task;
             concatenate U_cat (m, T k), s_cat (T k), V_cat^T (T k, n) (the r - T k empty slots
             of the reference stay zero and contribute nothing, so they are left out);
             U_perp = polar(U_cat), V_perp^T = polar(V_cat^T).
  combine    merged = U_perp diag(s_cat) V_perp^T   (singular values kept as they are).
Other tensors: the mean over tasks. theta = theta_0 + lambda * merged (lambda on both).
When k = 0 (more tasks than the rank) a matrix falls back to the mean. Invariant to SVD
sign flips (polar(U S) = polar(U) S for a diagonal sign matrix S). No data, no randomness.
"""

from __future__ import annotations

import torch

from merging.kernels.svd import polar
from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class TsvMParams(MethodParams):
    pass


def decompose(group: TensorGroup, params: TsvMParams) -> Factors:
    deltas = group.deltas
    if group.kind != "matrix":
        return {"mean": deltas.mean(dim=0)}
    t, m, n = deltas.shape
    k = min(m, n) // t
    if k == 0:
        return {"mean": deltas.mean(dim=0)}
    u, s, vh = torch.linalg.svd(deltas, full_matrices=False)  # batched over tasks
    u_cat = u[:, :, :k].permute(1, 0, 2).reshape(m, t * k)  # (m, T k)
    s_cat = s[:, :k].reshape(t * k)
    vh_cat = vh[:, :k, :].reshape(t * k, n)  # (T k, n)
    return {"u": polar(u_cat), "s": s_cat, "vh": polar(vh_cat)}


def combine(group: TensorGroup, factors: Factors, params: TsvMParams) -> torch.Tensor:
    if "mean" in factors:
        return factors["mean"]
    return (factors["u"] * factors["s"]) @ factors["vh"]


SPEC = MethodSpec(name="tsv_m", params=TsvMParams, decompose=decompose, combine=combine,
                  paper="Gargiulo et al. 2025, Task Singular Vectors, arXiv 2412.00081")
