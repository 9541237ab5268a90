"""NearSwap (mergekit): w = clamp(t / |delta|, 0, 1), theta = w theta_1 + (1 - w) theta_0."""

import pytest
import torch

from merging.api import merge_tensors

F64 = torch.float64


def test_worked_example():
    """t = 1e-4: a move of 0.5 is damped to t, -2e-4 is halved, 5e-5 is taken whole, no move stays."""
    base = torch.zeros(4, dtype=F64)
    model = torch.tensor([0.5, -2e-4, 5e-5, 0.0], dtype=F64)
    out = merge_tensors("nearswap", base, [model], params={"t": 1e-4}, compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([1e-4, -1e-4, 5e-5, 0.0], dtype=F64), rtol=0, atol=1e-18)


def test_no_entry_moves_more_than_t_and_t_zero_keeps_the_base():
    base, model = torch.randn(8, 8, dtype=F64), torch.randn(8, 8, dtype=F64)
    out = merge_tensors("nearswap", base, [model], params={"t": 0.3}, compute_dtype=F64)
    assert float((out - base).abs().max()) <= 0.3 + 1e-12
    assert torch.equal(merge_tensors("nearswap", base, [model], params={"t": 0.0}, compute_dtype=F64), base)


def test_same_as_mergekit():
    api = pytest.importorskip("mergekit.merge_methods.api")
    base = torch.randn(16, 8, dtype=F64)
    model = base + 0.01 * torch.randn(16, 8, dtype=F64)
    expected = api.merge_tensors([base, model], "nearswap", parameters={"t": 0.005}, base_index=0)
    out = merge_tensors("nearswap", base, [model], params={"t": 0.005}, compute_dtype=F64)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-15)
