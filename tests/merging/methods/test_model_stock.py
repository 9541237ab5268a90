"""Model Stock: t = N cos / (1 + (N - 1) cos) toward the mean of the fine-tunes."""

import torch

from merging.api import merge_tensors

F64 = torch.float64


def test_two_orthogonal_deltas_give_t_zero():
    base = torch.zeros(2, dtype=F64)
    out = merge_tensors("model_stock", base, [torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)], compute_dtype=F64)
    assert torch.allclose(out, base)


def test_by_hand_angle():
    base = torch.zeros(2, dtype=F64)
    a, b = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64)
    cos = 1 / math_sqrt2()
    t = 2 * cos / (1 + cos)
    out = merge_tensors("model_stock", base, [a, b], compute_dtype=F64)
    assert torch.allclose(out, t * (a + b) / 2)


def math_sqrt2() -> float:
    return 2**0.5


def test_identical_deltas_return_the_fine_tune():
    base = torch.randn(3, 3, dtype=F64)
    d = torch.randn(3, 3, dtype=F64)
    out = merge_tensors("model_stock", base, [base + d, base + d, base + d], compute_dtype=F64)
    assert torch.allclose(out, base + d)
