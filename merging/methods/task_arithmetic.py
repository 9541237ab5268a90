"""Task Arithmetic — sum of weighted task vectors.

Paper: Ilharco et al., ICLR 2023, "Editing Models with Task Arithmetic", arXiv 2212.04089.

Math (per tensor, any shape): tau_t = theta_t - theta_0;
    merged_delta = sum_t w_t tau_t            (normalize: false, the default)
    merged_delta = sum_t w_t tau_t / sum_t w_t (normalize: true)
    theta = theta_0 + lambda * merged_delta
The paper tunes lambda on validation (about 0.3 for 8 vision tasks); lambda defaults to 1
as in mergekit. No randomness, no data. Follows ``../shared/specs/svd-methods.md`` §1.
"""

from __future__ import annotations

from pydantic import Field

from merging.kernels.fuse import combine_weighted_sum
from merging.params import CoreSpaceParams, WeightedModelParams
from merging.spec import MethodSpec


class TaskArithmeticParams(CoreSpaceParams):
    normalize: bool = Field(False, description="Divide by the sum of the weights.")
    int8_mask: bool = Field(False, description="Accepted for mergekit configs; has no effect here.")


SPEC = MethodSpec(
    name="task_arithmetic",
    params=TaskArithmeticParams,
    model_params=WeightedModelParams,
    combine=combine_weighted_sum,
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv 2212.04089",
    lora_span=True,
)
