"""RAM (mergekit ram): entries changed by one model keep its value, by several their mean."""

import pytest
import torch

from merging.api import merge_tensors

F64 = torch.float64
BASE = torch.zeros(4, dtype=F64)
MODELS = [torch.tensor(v, dtype=F64) for v in ([1.0, 0.05, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.5])]


def test_worked_example():
    """epsilon 0.1. Entry 0: changed by all three, mean (1 + 3 - 1) / 3 = 1; entry 1: 0.05 <= epsilon,
    unchanged; entry 2: only model 1, 2 in full; entry 3: only model 3, 0.5 in full."""
    out = merge_tensors("ram", BASE, MODELS, params={"epsilon": 0.1}, compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=F64))


def test_epsilon_is_exclusive():
    """|delta| == epsilon counts as unchanged."""
    out = merge_tensors("ram", BASE, [BASE + 0.5, BASE + 1.0], params={"epsilon": 0.5}, compute_dtype=F64)
    assert torch.allclose(out, BASE + 1.0)


def test_same_as_mergekit():
    api = pytest.importorskip("mergekit.merge_methods.api")
    base = torch.randn(16, 8, dtype=F64)
    models = [base + 0.02 * torch.randn(16, 8, dtype=F64) for _ in range(3)]
    expected = api.merge_tensors([base, *models], "ram", parameters={"epsilon": 0.02}, base_index=0)
    out = merge_tensors("ram", base, models, params={"epsilon": 0.02}, compute_dtype=F64)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14)
