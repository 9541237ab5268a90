"""Task Arithmetic — sum of weighted task vectors.

Paper: Ilharco et al., ICLR 2023, "Editing Models with Task Arithmetic", arXiv 2212.04089.

Math (per tensor, any shape): tau_t = theta_t - theta_0;
    merged_delta = sum_t w_t tau_t            (normalize: false, the default)
    merged_delta = sum_t w_t tau_t / sum_t w_t (normalize: true)
    theta = theta_0 + lambda * merged_delta
The paper tunes lambda on validation (about 0.3 for 8 vision tasks); lambda defaults to 1
as in mergekit. No randomness, no data. Follows ``../shared/specs/svd-methods.md`` §1.
LoRA inputs, D_t = s_t B_t A_t: the sum is itself a LoRA product, B = [c_1 s_1 B_1 | ...],
A = [A_1; ...], c_t = w_t (/ sum_t w_t when normalizing) (``combine_factors``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.kernels.fuse import combine_weighted_sum
from merging.params import CoreSpaceParams, WeightedModelParams
from merging.spec import Factors, MethodSpec, TensorGroup


class TaskArithmeticParams(CoreSpaceParams):
    normalize: bool = Field(False, description="Divide by the sum of the weights.")
    int8_mask: bool = Field(False, description="Accepted for mergekit configs; has no effect here.")


def combine_factors(group: TensorGroup, factors: Factors, params: TaskArithmeticParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum of LoRA inputs as one LoRA product (b, a), rank sum_t r_t."""
    weights = [p.weight for p in group.model_params]
    total = sum(weights) if params.normalize and abs(sum(weights)) >= 1e-8 else 1.0  # fuse_deltas' guard
    lora = group.lora
    b = torch.cat([b_t * (w * s / total) for b_t, w, s in zip(lora.b, weights, lora.scales)], dim=1)
    return b, torch.cat(list(lora.a), dim=0)


SPEC = MethodSpec(
    name="task_arithmetic",
    params=TaskArithmeticParams,
    model_params=WeightedModelParams,
    combine=combine_weighted_sum,
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv 2212.04089",
    lora_span=True,
    combine_factors=combine_factors,
    factors_when=lambda params: params.merge_space == "full",
)
