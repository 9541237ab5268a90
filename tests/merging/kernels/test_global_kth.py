"""The streamed whole-model k-th smallest magnitude equals torch.kthvalue on the concatenation."""

import pytest
import torch

from merging.kernels.global_kth import StreamingKth


@pytest.mark.parametrize("k", [1, 2, 17, 1500, 2999, 3000])
def test_streaming_kth_exact(k):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(500, generator=g) * 10.0**e for e in range(-3, 3)]
    chunks[2][:10] = 0.0  # zeros and ties
    chunks[3][:5] = chunks[3][5]
    counter = StreamingKth()
    for c in chunks:
        counter.count_high(c)
    counter.settle_high(k)
    for c in chunks:
        counter.count_low(c)
    expected = torch.kthvalue(torch.cat(chunks).abs(), k).values.item()
    assert counter.value() == expected


def test_k_out_of_range():
    counter = StreamingKth()
    counter.count_high(torch.ones(3))
    with pytest.raises(ValueError):
        counter.settle_high(4)
