"""Model Stock — interpolate the average of fine-tunes toward the base by their angle.

Paper: Jang, Yun & Han, ECCV 2024, "Model Stock: All we need is just a few fine-tuned
models", arXiv 2403.19522.

Math, per tensor (or per row with ``filter_wise``), N >= 2 fine-tunes:
    cos = mean over pairs i<j of cos(tau_i, tau_j)   (norm product clamped to >= 1e-6)
    t = N cos / (1 + (N - 1) cos)
    theta = t * mean_i(theta_i) + (1 - t) * theta_0,  i.e. merged delta = t * mean_i(tau_i).
Where 1 + (N-1) cos is ~0 (|.| < 1e-6) t = 0 (keep the base), as mergekit 0.1.5. No
parameters besides lambda, no data, no randomness. See ``../shared/specs/svd-methods.md`` §11.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="One angle per row instead of per tensor.")


def combine(group: TensorGroup, factors: Factors, params: ModelStockParams) -> torch.Tensor:
    deltas = factors["deltas"]
    count = deltas.shape[0]
    rows = deltas.shape[1] if params.filter_wise and deltas.dim() > 2 else 1
    flat = deltas.reshape(count, rows, -1)  # (N, rows, cols)
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            norms = flat[i].norm(dim=-1) * flat[j].norm(dim=-1)
            cosines.append(((flat[i] * flat[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (rows, 1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), count * cos / safe)  # (rows, 1)
    mean_delta = deltas.mean(dim=0)
    return (t * mean_delta.reshape(rows, -1)).reshape(mean_delta.shape)

SPEC = MethodSpec(name="model_stock", params=ModelStockParams, combine=combine, min_models=2,
                  paper="Jang et al. 2024, Model Stock, arXiv 2403.19522")
