"""NearSwap — take the fine-tune's value only where it is near the base's.

Source: mergekit 0.1.5 ``nearswap`` (github.com/arcee-ai/mergekit,
``merge_methods/nearswap.py``; introduced with huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

Math, per element, base theta_0 and the one other model theta_1, delta = theta_1 - theta_0:
    w = clamp(t / max(|delta|, 1e-6), 0, 1)
    theta = w theta_1 + (1 - w) theta_0,   i.e. merged delta = w * delta.
Entries that moved by at most t are swapped in whole; larger moves are damped by t / |delta|,
so every entry moves by at most t. t = 0 keeps the base. mergekit has no default for ``t``;
here it defaults to 1e-4, the value the method's reference model is named after. ``t`` may
be a per-layer gradient or filtered, as every setting.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class NearswapParams(MethodParams):
    t: float = Field(1e-4, ge=0.0, description="Largest move taken whole; larger moves are scaled down to t.")


def combine(group: TensorGroup, factors: Factors, params: NearswapParams) -> torch.Tensor:
    delta = factors["deltas"][0]
    weight = (params.t / delta.abs().clamp(min=1e-6)).clamp(min=0.0, max=1.0)
    return weight * delta


SPEC = MethodSpec(
    name="nearswap",
    params=NearswapParams,
    combine=combine,
    min_models=1,
    max_models=1,
    paper="mergekit nearswap (alchemonaut, QuartetAnemoi-70B-t0.0001)",
)
