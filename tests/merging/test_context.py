"""The context's finiteness check (a min/max reduction) against ``torch.isfinite``."""

from __future__ import annotations

import pytest
import torch

from merging.context import all_finite


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_agrees_with_isfinite(dtype):
    base = torch.randn(1000, dtype=torch.float64).to(dtype)
    assert all_finite(base) and all_finite(base.reshape(10, 100)) and all_finite(torch.tensor(1.5, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 517, 999):
            x = base.clone()
            x[where] = bad
            assert not all_finite(x) and not torch.isfinite(x).all()
    assert all_finite(torch.empty(0, 3, dtype=dtype))
    assert all_finite(torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min, -0.0], dtype=dtype))


def test_integer_tensors_are_finite():
    assert all_finite(torch.arange(10)) and all_finite(torch.zeros(3, dtype=torch.bool))
