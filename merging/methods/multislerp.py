"""Multi-SLERP — barycentric interpolation of several models on a hypersphere.

Source: mergekit 0.1.5 ``multislerp`` (github.com/arcee-ai/mergekit,
``merge_methods/multislerp.py``; C. Goddard, goddard.blog/posts/multislerp-wow-what-a-cool-idea).

Math, per tensor, with points x_i = delta_i (with ``base_model``) or theta_i (without),
flattened, weights w_i (divided by sum_i w_i when ``normalize_weights``):
    u_i = x_i / (||x_i|| + eps)                                 unit directions
    m = sum_i w_i u_i / ||sum_i w_i u_i||                       weighted mean direction
    v = sum_i w_i (u_i - (u_i . m) m)                           tangent vectors at m, summed
    r = m cos(|v|) + v sin(|v|) / |v|,  |v| = ||v|| + eps         exponential map back
    x = (sum_i w_i ||x_i||) r                                   rescaled by the mean norm
    theta = theta_0 + x (with base) or x (without).
One model returns that model unchanged. Where the weighted mean direction vanishes
(||sum w_i u_i|| < eps, antipodal inputs with balancing weights) two models fall back to
the linear mix w_1 x_1 + w_2 x_2, more are an error naming the tensor, as in mergekit.
mergekit requires ``weight``; here it defaults to 1 (equal weights). A zero weight sum with
``normalize_weights`` is an error (mergekit would write NaN). With a ``base_model``, list only the
other models: the engine hands a method-without-required-base every listed model, so a listed
base would be one more (zero) point here, while mergekit sets it aside as the base.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.errors import MergeConfigError
from merging.params import MethodParams, WeightedModelParams
from merging.spec import Factors, MethodSpec, TensorGroup


class MultislerpParams(MethodParams):
    normalize_weights: bool = Field(True, description="Divide the weights by their sum.")
    eps: float = Field(1e-8, ge=0.0, description="Guard added to norms.")


def combine(group: TensorGroup, factors: Factors, params: MultislerpParams) -> torch.Tensor:
    deltas = factors["deltas"]
    if deltas.shape[0] == 1:
        return deltas[0]
    points = deltas if group.has_base else group.base.unsqueeze(0) + deltas  # (T, ...)
    flat = points.reshape(points.shape[0], -1)  # (T, N)
    weights = torch.tensor([p.weight for p in group.model_params], dtype=flat.dtype, device=flat.device)  # (T,)
    if params.normalize_weights:
        if abs(float(weights.sum())) < 1e-12:
            raise MergeConfigError(f"multislerp: the model weights sum to 0 for tensor {group.name!r}; "
                                   "change a weight or set normalize_weights: false")
        weights = weights / weights.sum()
    w = weights.unsqueeze(-1)  # (T, 1)
    norms = flat.norm(dim=-1, keepdim=True)  # (T, 1)
    units = flat / (norms + params.eps)
    mean = (units * w).sum(dim=0)
    mean_norm = mean.norm()
    if mean_norm < params.eps:
        if flat.shape[0] != 2:
            raise MergeConfigError(
                f"multislerp: tensor {group.name!r}: the weighted mean direction of the inputs is zero "
                "(antipodal inputs whose weights balance out); change the weights")
        merged = (points[0] * weights[0] + points[1] * weights[1]).reshape(points.shape[1:])
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean  # (T, N)
        tangent = (tangents * w).sum(dim=0)
        tangent_norm = tangent.norm() + params.eps
        on_sphere = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        merged = (on_sphere * (norms.squeeze(-1) * weights).sum()).reshape(points.shape[1:])
    return merged if group.has_base else merged - group.base


SPEC = MethodSpec(
    name="multislerp",
    params=MultislerpParams,
    model_params=WeightedModelParams,
    combine=combine,
    base="optional",
    min_models=1,
    paper="mergekit multislerp (Goddard, goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
)
