"""SLERP and NuSLERP — spherical interpolation between two models.

SLERP (Shoemake 1985; as used by mergekit and FusionBench): with v0 = base, v1 = the other
model, flattened, u_i = v_i / ||v_i||, d = u0 . u1, Omega = arccos d:
    theta = [sin((1-t) Omega) v0 + sin(t Omega) v1] / sin Omega,  lerp when |d| > 0.9995.
``t`` (default 0.5) may be a per-layer gradient list and per-module filters, as mergekit
accepts them (``t: [{filter: self_attn, value: [0, 0.5, 1]}, {value: 0.5}]``). Exactly one
model besides the base.

NuSLERP (mergekit ``nuslerp``): t = w_2 / (w_1 + w_2) from the per-model weights (0.5 if they
sum to ~0); one angle for the flattened tensor (``nuslerp_flatten: true``) or per row /
column; with a ``base_model`` it interpolates the two task vectors and adds the base.
Exactly two models besides the base. Both: merged delta = result - theta_0, times lambda.
See ``../shared/specs/svd-methods.md`` §10.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.kernels.interp import nuslerp, slerp
from merging.params import MethodParams, WeightedModelParams
from merging.spec import Factors, MethodSpec, TensorGroup


class SlerpParams(MethodParams):
    t: float = Field(0.5, ge=0.0, le=1.0, description="Interpolation factor: 0 = base, 1 = the other model.")


class NuslerpParams(MethodParams):
    nuslerp_flatten: bool = Field(True, description="One angle for the whole tensor.")
    nuslerp_row_wise: bool = Field(False, description="When not flattened: one angle per column slice (dim 0) instead of per row.")


def combine_slerp(group: TensorGroup, factors: Factors, params: SlerpParams) -> torch.Tensor:
    other = group.base + factors["deltas"][0]
    return slerp(params.t, group.base, other) - group.base


def combine_nuslerp(group: TensorGroup, factors: Factors, params: NuslerpParams) -> torch.Tensor:
    w1, w2 = (p.weight for p in group.model_params)
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    deltas = factors["deltas"]
    if group.has_base:
        return nuslerp(t, deltas[0], deltas[1], flatten=params.nuslerp_flatten, row_wise=params.nuslerp_row_wise)
    models = group.base.unsqueeze(0) + deltas
    merged = nuslerp(t, models[0], models[1], flatten=params.nuslerp_flatten, row_wise=params.nuslerp_row_wise)
    return merged - group.base


SLERP_SPEC = MethodSpec(name="slerp", params=SlerpParams, combine=combine_slerp, min_models=1, max_models=1,
                        paper="Shoemake 1985, Animating rotation with quaternion curves (SLERP)")
NUSLERP_SPEC = MethodSpec(name="nuslerp", params=NuslerpParams, model_params=WeightedModelParams,
                          combine=combine_nuslerp, base="optional", min_models=2, max_models=2,
                          paper="mergekit nuslerp (Goddard et al. 2024, arXiv 2403.13257)")
