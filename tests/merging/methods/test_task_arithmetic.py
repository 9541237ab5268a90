"""Task Arithmetic: theta_0 + lambda * sum_t w_t tau_t."""

import torch

from merging.api import merge_tensors

F64 = torch.float64


def test_by_hand():
    base = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    a = torch.tensor([2.0, 0.0, 1.0], dtype=F64)  # tau = (1, -1, 0)
    b = torch.tensor([1.0, 3.0, 0.0], dtype=F64)  # tau = (0, 2, -1)
    out = merge_tensors("task_arithmetic", base, [a, b], params={"lambda": 0.5},
                        model_params=[{"weight": 1.0}, {"weight": 2.0}], compute_dtype=F64)
    # 1 + 0.5 * (tau_a + 2 tau_b) = 1 + 0.5 * (1, 3, -2)
    assert torch.allclose(out, torch.tensor([1.5, 2.5, 0.0], dtype=F64))


def test_normalize_divides_by_weight_sum():
    base = torch.zeros(2, dtype=F64)
    out = merge_tensors("task_arithmetic", base, [base + 2, base + 4], params={"normalize": True},
                        model_params=[{"weight": 1.0}, {"weight": 3.0}], compute_dtype=F64)
    assert torch.allclose(out, torch.full((2,), 14 / 4, dtype=F64))


def test_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    base, *models = (torch.randn(5, 3, generator=g, dtype=F64) for _ in range(4))
    one = merge_tensors("task_arithmetic", base, models, compute_dtype=F64)
    two = merge_tensors("task_arithmetic", base, models[::-1], compute_dtype=F64)
    assert torch.allclose(one, two)
