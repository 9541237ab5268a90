"""RAM+ (tensor-local) — RAM with each model's unique entries boosted by its overlap ratio.

Paper: "Reinforced Agent Merging", arXiv 2601.13572 (RAM+); the tensor-local variant of
mergekit 0.1.5 ``ramplus_tl`` (github.com/arcee-ai/mergekit, ``merge_methods/ram.py``).

Math, per tensor, with RAM's changed_t,j = |tau_t,j| > epsilon and counts c_j (``ram.py``):
    shared_t = #{j : changed_t,j and c_j > 1},   unique_t = #{j : changed_t,j and c_j = 1}
    rho_t = shared_t / max(unique_t, epsilon),   s_t = 1 + r clamp(rho_t, 0, alpha)
    merged_j = sum_t changed_t,j tau_t,j * (s_t if c_j = 1 else 1 / c_j)
A model that shares much of what it changed has its few unique entries scaled up (by at
most 1 + r alpha), compensating their dilution-free but sparse contribution. The counts are
per tensor ("tensor-local"), not over the whole model. mergekit guards the ratio with
epsilon itself, so with epsilon = 0 a model that changed nothing in a tensor (shared_t =
unique_t = 0) gives 0/0 and mergekit writes NaN for the whole tensor; its scale multiplies
nothing, so here unique_t is clamped to 1 instead (same result wherever mergekit's is finite).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.methods.ram import changed_entries
from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class RamPlusParams(MethodParams):
    epsilon: float = Field(1e-5, ge=0.0, description="A delta entry with |value| <= epsilon counts as unchanged.")
    r: float = Field(0.1, ge=0.0, description="Strength of the boost of unique entries.")
    alpha: float = Field(0.2, ge=0.0, description="Cap on the shared/unique ratio.")


def combine(group: TensorGroup, factors: Factors, params: RamPlusParams) -> torch.Tensor:
    deltas = factors["deltas"]
    flat = deltas.reshape(deltas.shape[0], -1)  # (T, N)
    changed, counts = changed_entries(deltas, params.epsilon)
    unique = counts == 1  # (N,)
    shared_count = (changed & ~unique).sum(dim=1)  # (T,) counts >= 1 where changed, so ~unique = shared
    unique_count = (changed & unique).sum(dim=1)
    ratio = shared_count / unique_count.clamp(min=params.epsilon if params.epsilon > 0 else 1)
    boost = 1 + params.r * ratio.clamp(min=0, max=params.alpha)  # (T,)
    kept = flat * changed
    per_model = torch.where(unique, kept * boost.to(flat.dtype).unsqueeze(-1), kept / counts.clamp(min=1))
    return per_model.sum(dim=0).reshape(deltas.shape[1:])


SPEC = MethodSpec(
    name="ramplus_tl",
    params=RamPlusParams,
    combine=combine,
    paper="Reinforced Agent Merging (RAM+, tensor-local), arXiv 2601.13572",
)
