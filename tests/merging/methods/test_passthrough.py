"""Passthrough (mergekit): a copy of the one model, optionally scaled."""

import pytest
import torch

from merging.api import merge_tensors
from merging.errors import MergeConfigError

F64 = torch.float64


def test_copy_without_base_is_bit_exact():
    model = torch.randn(4, 3, dtype=torch.bfloat16)
    out = merge_tensors("passthrough", model, [model], has_base=False, compute_dtype=torch.float32)
    assert torch.equal(out.to(torch.bfloat16), model)


def test_scale_multiplies_the_model():
    model = torch.tensor([1.0, -2.0, 4.0], dtype=F64)
    out = merge_tensors("passthrough", model, [model], model_params=[{"scale": 0.25}], has_base=False, compute_dtype=F64)
    assert torch.equal(out, torch.tensor([0.25, -0.5, 1.0], dtype=F64))


def test_a_separate_base_only_supplies_the_reference():
    base, model = torch.tensor([5.0, 5.0], dtype=F64), torch.tensor([1.0, 3.0], dtype=F64)
    assert torch.allclose(merge_tensors("passthrough", base, [model], compute_dtype=F64), model)
    scaled = merge_tensors("passthrough", base, [model], params={"scale": 2.0}, compute_dtype=F64)
    assert torch.allclose(scaled, 2 * model)


def test_more_than_one_model_is_refused():
    with pytest.raises(MergeConfigError, match="exactly 1"):
        merge_tensors("passthrough", torch.zeros(2), [torch.ones(2), torch.ones(2)])
