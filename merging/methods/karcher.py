"""Karcher mean — the Riemannian (Fréchet) mean of the models' directions on the unit sphere.

Source: mergekit 0.1.5 ``karcher`` (github.com/arcee-ai/mergekit, ``merge_methods/karcher.py``;
reference arXiv 2603.04972). Karcher, 1977, "Riemannian center of mass and mollifier smoothing".

Math, per tensor, over the T input tensors theta_i (full weights, not deltas), equal weights
a_i = 1/T (mergekit hard-codes them), flattened:
    u_i = theta_i / ||theta_i||; only the V inputs with ||theta_i|| > tol take part, weights 1/V
    m_0 = normalize(sum_i u_i / V)            (u of the first valid input if that is ~0)
    repeat at most max_iter times:
        g = sum_i (1/V) (phi_i / sin phi_i) (u_i - (u_i . m) m),  phi_i = arccos(u_i . m)
            (inputs within tol of m, phi_i < tol, are skipped)
        stop when ||g|| < tol;  m <- normalize(cos||g|| m + sin||g|| g / ||g||)
    theta = (sum_i ||theta_i|| / T) m          (mean norm over all T inputs)
One input returns it unchanged; all inputs (near) zero give zero. The stopping tests read a
scalar per iteration (at most max_iter per tensor), as mergekit's loop does.

Inputs: every listed model, the base included when it is listed in ``models``; without
``base_model`` the first model is the reference the deltas are taken against. mergekit also
adds a ``base_model`` that is not listed as one more input; mergeflow's engine hands a method
only the listed models, so list the base under ``models`` to include it (a config that sets
``base_model`` without listing it differs from mergekit's).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.params import MethodParams
from merging.spec import Factors, MethodSpec, TensorGroup


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=0, description="Most Riemannian gradient steps per tensor.")
    tol: float = Field(1e-5, ge=0.0, description="Stop when the tangent step is shorter; also the zero-norm threshold.")


def karcher_mean(points: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher mean of ``points`` ``(T, N)`` on the sphere, rescaled by their mean norm: ``(N,)``."""
    count = points.shape[0]
    norms = points.norm(dim=-1)  # (T,)
    safe = torch.where(norms == 0, torch.ones_like(norms), norms)
    units = points / safe.unsqueeze(-1)  # a zero input stays zero
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(points[0])
    units = units[valid]  # (V, N)
    alpha = 1.0 / units.shape[0]
    mean = (units * alpha).sum(dim=0)
    mean_norm = mean.norm()
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)  # (V,)
        angles = torch.arccos(dots)
        far = angles >= tol
        coefficients = torch.where(far, alpha * angles / torch.where(far, torch.sin(angles), torch.ones_like(angles)), 0.0)
        tangent = (coefficients.unsqueeze(-1) * (units - dots.unsqueeze(-1) * mean)).sum(dim=0)
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        mean_norm = mean.norm()
        if mean_norm > tol:
            mean = mean / mean_norm
    return (norms.sum() / count) * mean


def combine(group: TensorGroup, factors: Factors, params: KarcherParams) -> torch.Tensor:
    deltas = factors["deltas"]
    if deltas.shape[0] == 1:
        return deltas[0]
    points = group.base.unsqueeze(0) + deltas  # (T, ...) every input's weights
    merged = karcher_mean(points.reshape(points.shape[0], -1), params.max_iter, params.tol)
    return merged.reshape(group.base.shape) - group.base


SPEC = MethodSpec(
    name="karcher",
    params=KarcherParams,
    combine=combine,
    base="input",
    min_models=1,
    paper="Karcher mean of the models (mergekit karcher; arXiv 2603.04972)",
)
