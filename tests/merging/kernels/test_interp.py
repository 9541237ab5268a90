"""SLERP / NuSLERP kernels against closed forms."""

import math

import torch

from merging.kernels.interp import nuslerp, slerp


def test_slerp_orthogonal_unit_vectors_midpoint():
    v0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v1 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = slerp(0.5, v0, v1)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)], dtype=torch.float64))
    assert torch.allclose(slerp(0.0, v0, v1), v0) and torch.allclose(slerp(1.0, v0, v1), v1)


def test_slerp_unnormalized_inputs_keep_scale():
    v0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    v1 = torch.tensor([0.0, 4.0], dtype=torch.float64)
    # theta = pi/2: sin(pi/4) * v0 + sin(pi/4) * v1
    assert torch.allclose(slerp(0.5, v0, v1), math.sin(math.pi / 4) * (v0 + v1))


def test_slerp_colinear_falls_back_to_lerp():
    v0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(slerp(0.25, v0, 3 * v0), 0.75 * v0 + 0.25 * 3 * v0)


def test_nuslerp_row_wise_angles():
    v0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    v1 = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    out = nuslerp(0.5, v0, v1, flatten=False)
    assert torch.allclose(out[0], torch.tensor([math.sqrt(0.5), math.sqrt(0.5)], dtype=torch.float64))
    assert torch.allclose(out[1], torch.tensor([1.5, 0.0], dtype=torch.float64))  # colinear -> lerp
