"""Linear — weighted average of model weights ("model soups").

Paper: Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time", arXiv 2203.05482.

Math (per tensor, over the listed models M_i, the base counting as a model if listed):
    theta = sum_i w_i M_i / sum_i w_i      (normalize: true, the default)
    theta = sum_i w_i M_i                  (normalize: false)
As a delta against the reference model theta_0: merged_delta = theta - theta_0, scaled by
``lambda`` (default 1). Weights default to 1; a zero weight sum with ``normalize`` is an
error. Matches mergekit's ``linear`` (which ignores ``base_model`` as a base).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.errors import MergeConfigError
from merging.kernels.fuse import by_positions
from merging.params import MethodParams, WeightedModelParams
from merging.spec import Factors, MethodSpec, TensorGroup


class LinearParams(MethodParams):
    normalize: bool = Field(True, description="Divide by the sum of the weights.")


def combine(group: TensorGroup, factors: Factors, params: LinearParams) -> torch.Tensor:
    weights = torch.tensor([p.weight for p in group.model_params], dtype=group.base.dtype, device=group.base.device)
    total = float(weights.sum())
    if params.normalize and abs(total) < 1e-12:
        raise MergeConfigError(f"linear: the model weights sum to 0 for tensor {group.name!r}; "
                               "change a weight or set normalize: false")

    def average(deltas: torch.Tensor, base: torch.Tensor) -> torch.Tensor:  # per position: chunked when large
        w = weights.reshape((-1,) + (1,) * base.dim())  # (T, 1, ...)
        merged = ((base.unsqueeze(0) + deltas) * w).sum(dim=0)  # the models, (T, ...), weighted and summed
        return (merged / total if params.normalize else merged) - base

    return by_positions(average, factors["deltas"], group.base)


SPEC = MethodSpec(
    name="linear",
    params=LinearParams,
    model_params=WeightedModelParams,
    combine=combine,
    base="input",
    paper="Wortsman et al. 2022, Model soups, arXiv 2203.05482",
    lora_span=True,
)
