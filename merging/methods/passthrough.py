"""Passthrough — copy one model's tensors, optionally scaled.

Source: mergekit 0.1.5 ``passthrough`` (github.com/arcee-ai/mergekit,
``merge_methods/passthrough.py``), mergekit's tool for layer stacking ("frankenmerges").

Math, per tensor, for the one input model theta_1:
    theta = scale * theta_1       (scale given)
    theta = theta_1               (scale unset, the default: a plain copy)
As a merged delta against the reference theta_0: scale * theta_1 - theta_0.

Without ``base_model`` the one model is also the reference, so the delta is zero and the
copy is bit-exact (any dtype). mergekit refuses a ``base_model`` other than the model
(its base would count as a second input); here such a base only supplies the output's
config and tokenizer, and the copy goes through theta_0 + (theta_1 - theta_0) in the compute
dtype (float32 rounding). Layer stacking ("frankenmerges") is ``slices:`` with one source per
slice (``merging/slices.py`` maps each output tensor to its source; this file copies it).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.params import MethodParams, ModelParams
from merging.spec import Factors, MethodSpec, TensorGroup


class PassthroughModelParams(ModelParams):
    scale: float | None = Field(None, description="Multiply the copied tensor by this; unset copies it unchanged.")


class PassthroughParams(MethodParams):
    pass


def combine(group: TensorGroup, factors: Factors, params: PassthroughParams) -> torch.Tensor:
    delta = factors["deltas"][0]
    scale = group.model_params[0].scale
    if scale is None:
        return delta
    return (group.base + delta) * scale - group.base


SPEC = MethodSpec(
    name="passthrough",
    params=PassthroughParams,
    model_params=PassthroughModelParams,
    combine=combine,
    base="input",
    min_models=1,
    max_models=1,
    paper="mergekit passthrough (Goddard et al. 2024, arXiv 2403.13257)",
)
