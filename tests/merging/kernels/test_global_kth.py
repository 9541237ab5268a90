"""The streamed whole-model k-th smallest magnitude equals torch.kthvalue on the
concatenation, exactly, in float32 and float64."""

import pytest
import torch

from merging.kernels.global_kth import StreamingKth


def _select(chunks, k, dtype):
    counter = StreamingKth(dtype)
    first = True
    while not counter.done:
        for c in chunks:
            counter.feed(c)
        counter.settle(k if first else None)
        first = False
    return counter.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 17, 1500, 2999, 3000])
def test_streaming_kth_exact(k, dtype):
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(500, generator=g, dtype=torch.float64) * 10.0**e).to(dtype) for e in range(-3, 3)]
    chunks[2][:10] = 0.0  # zeros and ties
    chunks[3][:5] = chunks[3][5]
    expected = torch.kthvalue(torch.cat(chunks).abs(), k).values.item()
    assert _select(chunks, k, dtype) == expected


def test_float64_values_that_share_a_float32_rounding_are_told_apart():
    x = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 2e-12, 0.5], dtype=torch.float64)
    assert _select([x], 3, torch.float64) == 1.0 + 1e-12


def test_k_out_of_range():
    counter = StreamingKth()
    counter.feed(torch.ones(3))
    with pytest.raises(ValueError):
        counter.settle(4)
