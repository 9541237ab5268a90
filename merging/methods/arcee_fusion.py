"""Arcee Fusion — keep only the fine-tune's entries whose importance is an outlier.

Source: mergekit 0.1.5 ``arcee_fusion`` (github.com/arcee-ai/mergekit,
``merge_methods/arcee_fusion.py``; Arcee AI, arcee.ai).

Math, per tensor, base theta_0 and the one other model theta_1, delta = theta_1 - theta_0,
softmax and KL along the last dim (a 1-D tensor is one row):
    p = softmax(theta_1) + 1e-8,  q = softmax(theta_0) + 1e-8
    importance = |delta| * sum_last(p log(p / q))          (per-row KL, broadcast over the row)
    tau = Q2 + 1.5 (Q3 - Q1)   of the importances (median plus 1.5 interquartile ranges)
    theta = theta_0 + delta * [importance >= tau].
Quantiles are order statistics of the sorted values at floor(q (n - 1)). Above
``quantile_sample_size`` entries (mergekit: 1,000,000) they come from that many positions drawn
uniformly with replacement: from the per-tensor generator here (seeded by (seed, tensor name)),
from torch's global stream in mergekit, so only tensors at most that large match mergekit
bit for bit; larger ones match statistically (at 10^6 draws the rank of a sampled quartile
has a standard error of about 0.04 %).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class ArceeFusionParams(MethodParams):
    quantile_sample_size: int = Field(1_000_000, ge=1, description="Above this many entries the quartiles come from a random sample of this size.")


def importance(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """|delta| times the per-row KL(softmax(theta_1) || softmax(theta_0)), shape of ``base``."""
    p = torch.softmax(base + delta, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    return delta.abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


def outlier_threshold(scores: torch.Tensor, sample_size: int, rng: torch.Generator) -> torch.Tensor:
    """Q2 + 1.5 (Q3 - Q1) of ``scores``, from a with-replacement sample when it is larger than ``sample_size``."""
    flat = scores.reshape(-1)
    if flat.numel() > sample_size:
        picks = torch.randint(flat.numel(), (sample_size,), generator=rng)
        flat = flat[picks.to(flat.device)]
    ordered = torch.sort(flat).values
    last = ordered.numel() - 1
    q1, q2, q3 = ordered[last // 4], ordered[last // 2], ordered[3 * last // 4]  # floor(q (n - 1))
    return q2 + 1.5 * (q3 - q1)


def sparsify(group: TensorGroup, factors: Factors, params: ArceeFusionParams, rng: torch.Generator) -> Factors:
    delta = factors["deltas"][0]
    scores = importance(group.base, delta)
    keep = scores >= outlier_threshold(scores, params.quantile_sample_size, rng)
    return {"deltas": (delta * keep).unsqueeze(0)}


def combine(group: TensorGroup, factors: Factors, params: ArceeFusionParams) -> torch.Tensor:
    return factors["deltas"][0]


SPEC = MethodSpec(
    name="arcee_fusion",
    params=ArceeFusionParams,
    sparsify=sparsify,
    combine=combine,
    min_models=1,
    max_models=1,
    random=True,
    paper="Arcee Fusion (mergekit arcee_fusion, github.com/arcee-ai/mergekit)",
    param_stages={"quantile_sample_size": "sparsify"},
)
