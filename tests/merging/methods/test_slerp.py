"""SLERP (with gradients/filters through the resolver) and NuSLERP."""

import math

import pytest
import torch

from merging.api import merge_tensors
from merging.errors import MergeConfigError

F64 = torch.float64


def test_slerp_midpoint_of_orthogonal_weights():
    base = torch.tensor([1.0, 0.0], dtype=F64)
    other = torch.tensor([0.0, 1.0], dtype=F64)
    out = merge_tensors("slerp", base, [other], params={"t": 0.5}, compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5)] * 2, dtype=F64))


def test_slerp_filter_and_gradient_resolution():
    base = torch.tensor([1.0, 0.0], dtype=F64)
    other = torch.tensor([0.0, 1.0], dtype=F64)
    t = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]
    out = merge_tensors("slerp", base, [other], params={"t": t}, name="model.layers.0.self_attn.q_proj.weight", compute_dtype=F64)
    assert torch.allclose(out, base)  # first gradient point (t = 0 outside a layer sweep)


def test_slerp_needs_exactly_one_other_model():
    with pytest.raises(MergeConfigError, match="exactly 1"):
        merge_tensors("slerp", torch.zeros(2), [torch.ones(2), torch.ones(2)])


def test_nuslerp_with_base_interpolates_task_vectors():
    base = torch.tensor([5.0, 5.0], dtype=F64)
    a, b = base + torch.tensor([1.0, 0.0], dtype=F64), base + torch.tensor([0.0, 1.0], dtype=F64)
    out = merge_tensors("nuslerp", base, [a, b], model_params=[{"weight": 1.0}, {"weight": 1.0}], compute_dtype=F64)
    assert torch.allclose(out, base + torch.tensor([math.sqrt(0.5)] * 2, dtype=F64))
