"""Spherical interpolation kernels (SLERP as mergekit / FusionBench, NuSLERP as mergekit)."""

from __future__ import annotations

import torch

__all__ = ["slerp", "nuslerp"]


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """SLERP of two whole tensors (flattened), applied to the unnormalized inputs.

    The angle comes from the normalized dot product (a norm <= eps is left unnormalized);
    when |cos| > ``dot_threshold`` it falls back to linear interpolation.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    norm_a, norm_b = a.norm(), b.norm()
    ua = a / norm_a if norm_a > eps else a
    ub = b / norm_b if norm_b > eps else b
    dot = torch.clamp((ua * ub).sum(), -1.0, 1.0)
    if dot.abs() > dot_threshold:
        return ((1 - t) * v0 + t * v1)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta) * v0 + (torch.sin(t * theta) / sin_theta) * v1


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True, row_wise: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """NuSLERP: one angle for the whole tensor (``flatten``) or one per slice along the last
    dim (dim 0 with ``row_wise``); colinear slices (1 - cos^2 <= eps^2) fall back to lerp."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.where(colinear, torch.ones_like(sin_theta), sin_theta)
    result = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if not flatten and row_wise:
        result = result.transpose(0, -1)
    return result.reshape(shape)
