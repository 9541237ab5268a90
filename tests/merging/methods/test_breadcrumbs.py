"""Model Breadcrumbs: outlier + small-magnitude masks, then sum or TIES."""

import torch

from merging.api import merge_tensors

F64 = torch.float64


def test_by_hand():
    base = torch.zeros(10, dtype=F64)
    a = torch.arange(1, 11, dtype=F64)
    out = merge_tensors("breadcrumbs", base, [a], model_params=[{"density": 0.3, "gamma": 0.1}], compute_dtype=F64)
    # drop the top 1 (10), keep 3 largest of the rest: 7, 8, 9
    expected = torch.zeros(10, dtype=F64)
    expected[6:9] = a[6:9]
    assert torch.equal(out, expected)


def test_ties_variant_elects_signs():
    base = torch.zeros(4, dtype=F64)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    b = torch.tensor([-1.5, 2.0, 3.0, 4.0], dtype=F64)
    params = [{"density": 1.0, "gamma": 0.0}] * 2
    out = merge_tensors("breadcrumbs_ties", base, [a, b], params={"normalize": True}, model_params=params, compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([-1.5, 2.0, 3.0, 4.0], dtype=F64))
