"""RAM — Reinforced Agent Merging: average only the models that changed an entry.

Paper: "Reinforced Agent Merging", arXiv 2601.13572; as implemented in mergekit 0.1.5
``ram`` (github.com/arcee-ai/mergekit, ``merge_methods/ram.py``).

Math, per tensor, task deltas tau_t (T models), per entry j:
    changed_t,j = |tau_t,j| > epsilon          (smaller moves count as unchanged, dropped)
    c_j = sum_t changed_t,j                    (how many models changed entry j)
    merged_j = sum_t changed_t,j tau_t,j / max(c_j, 1)
An entry changed by one model takes that model's value in full (no dilution by the others'
zeros); one changed by several takes their mean; one changed by none keeps the base.
theta = theta_0 + lambda merged. No per-model weights (mergekit has none). Its sibling
``ramplus_tl`` (``ramplus_tl.py``) rescales each model's unique entries.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.kernels.sign import disjoint_mean
from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class RamParams(MethodParams):
    epsilon: float = Field(1e-5, ge=0.0, description="A delta entry with |value| <= epsilon counts as unchanged.")


def changed_entries(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(changed mask ``(T, N)``, per-entry count of changing models ``(N,)``) of flattened deltas."""
    changed = deltas.reshape(deltas.shape[0], -1).abs() > epsilon
    return changed, changed.sum(dim=0)


def combine(group: TensorGroup, factors: Factors, params: RamParams) -> torch.Tensor:
    deltas = factors["deltas"]
    changed, _ = changed_entries(deltas, params.epsilon)
    return disjoint_mean(deltas.reshape(deltas.shape[0], -1), changed).reshape(deltas.shape[1:])


SPEC = MethodSpec(
    name="ram",
    params=RamParams,
    combine=combine,
    paper="Reinforced Agent Merging (RAM), arXiv 2601.13572",
)
