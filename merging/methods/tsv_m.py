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
LoRA inputs: each task's SVD from its factors, keeping min(k, r_t) triplets (see
``_lora_decompose``): equal to the dense route when k <= r_t; when k > r_t the dense route adds
arbitrary null vectors and the factor route does not.
"""

from __future__ import annotations

import torch

from merging.kernels.factor_svd import sum_svd
from merging.kernels.svd import polar
from merging.params import CoreSpaceParams
from merging.spec import Factors, MethodSpec, TensorGroup


class TsvMParams(CoreSpaceParams):
    pass


def decompose(group: TensorGroup, params: TsvMParams) -> Factors:
    deltas = group.deltas
    if group.kind != "matrix":
        return {"mean": deltas.mean(dim=0)}
    t, m, n = deltas.shape
    k = min(m, n) // t
    if k == 0:
        return {"mean": deltas.mean(dim=0)}
    if group.lora is not None:
        return _lora_decompose(group, k)
    u, s, vh = torch.linalg.svd(deltas, full_matrices=False)  # batched over tasks
    u_cat = u[:, :, :k].permute(1, 0, 2).reshape(m, t * k)  # (m, T k)
    s_cat = s[:, :k].reshape(t * k)
    vh_cat = vh[:, :k, :].reshape(t * k, n)  # (T k, n)
    return {"u": polar(u_cat), "s": s_cat, "vh": polar(vh_cat)}


def _lora_decompose(group: TensorGroup, k: int) -> Factors:
    """Each task's top triplets from its own factors (QR of B_t and A_t^T, SVD of an r x r
    core): min(k, r_t) of them, the task's non-zero ones. The dense route would fill a task's
    slots beyond r_t with arbitrary null vectors of singular value 0, which still enter the
    polar factors; the factor route leaves them out (lora-core.md §2, §6)."""
    dtype = group.deltas.dtype
    us, ss, vhs = [], [], []
    for b, a, scale in zip(group.lora.b, group.lora.a, group.lora.scales):
        u, s, vh = sum_svd([b], [a], [scale], dtype=torch.float64)
        keep = min(k, s.shape[0])
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vhs.append(vh[:keep])
    return {"u": polar(torch.cat(us, dim=1)).to(dtype), "s": torch.cat(ss).to(dtype),
            "vh": polar(torch.cat(vhs, dim=0)).to(dtype)}


def combine(group: TensorGroup, factors: Factors, params: TsvMParams) -> torch.Tensor:
    if "mean" in factors:
        return factors["mean"]
    return (factors["u"] * factors["s"]) @ factors["vh"]


SPEC = MethodSpec(name="tsv_m", params=TsvMParams, decompose=decompose, combine=combine, param_stages={"merge_space": "decompose"},
                  paper="Gargiulo et al. 2025, Task Singular Vectors, arXiv 2412.00081", lora_span=True)
