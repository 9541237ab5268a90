"""Linear: weighted average of weights (model soups)."""

import pytest
import torch

from merging.api import merge_tensors
from merging.errors import MergeConfigError

F64 = torch.float64


def test_weighted_average_by_hand():
    base = torch.tensor([0.0, 1.0], dtype=F64)
    a, b = torch.tensor([1.0, 3.0], dtype=F64), torch.tensor([4.0, -1.0], dtype=F64)
    out = merge_tensors("linear", base, [a, b], model_params=[{"weight": 1.0}, {"weight": 3.0}], compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([13 / 4, 0.0], dtype=F64))


def test_unnormalized_sum():
    base = torch.zeros(2, dtype=F64)
    a, b = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([3.0, 4.0], dtype=F64)
    out = merge_tensors("linear", base, [a, b], params={"normalize": False},
                        model_params=[{"weight": 0.5}, {"weight": 2.0}], compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([6.5, 9.0], dtype=F64))


def test_single_model_returns_it():
    base = torch.randn(3, 4, dtype=F64)
    a = torch.randn(3, 4, dtype=F64)
    assert torch.allclose(merge_tensors("linear", base, [a], compute_dtype=F64), a)


def test_zero_weight_sum_is_an_error():
    base = torch.zeros(2)
    with pytest.raises(MergeConfigError, match="sum to 0"):
        merge_tensors("linear", base, [base + 1, base + 2], model_params=[{"weight": 1.0}, {"weight": -1.0}])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_average_is_bit_identical(monkeypatch, dtype, normalize):
    """Large tensors are averaged a chunk of positions at a time (``by_positions``): same bits."""
    from merging.kernels import fuse

    g = torch.Generator().manual_seed(4)
    base = torch.randn(37, 29, generator=g, dtype=F64).to(dtype)
    models = [torch.randn(37, 29, generator=g, dtype=F64).to(dtype) for _ in range(3)]
    kwargs = dict(params={"normalize": normalize}, model_params=[{"weight": w} for w in (0.3, 1.1, 0.7)],
                  compute_dtype=dtype)
    whole = merge_tensors("linear", base, models, **kwargs)
    monkeypatch.setattr(fuse, "CHUNK", 128)  # 1073 positions: 9 chunks
    chunked = merge_tensors("linear", base, models, **kwargs)
    bits = {torch.float32: torch.int32, F64: torch.int64}[chunked.dtype]
    assert chunked.shape == whole.shape and torch.equal(chunked.view(bits), whole.view(bits))
