"""Chunked fusion: the same bits as fusing the whole stack at once."""

from __future__ import annotations

import pytest
import torch

from merging.kernels import fuse
from merging.kernels.fuse import fuse_deltas

_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tasks", [1, 2, 5, 9])
def test_chunked_fusion_is_bit_identical(monkeypatch, dtype, tasks):
    g = torch.Generator().manual_seed(tasks)
    deltas = torch.randn(tasks, 37, 29, generator=g, dtype=torch.float64).to(dtype)
    deltas[deltas.abs() < 0.5] = 0.0  # trimmed entries, zero-mass positions
    deltas[:, 3] = -0.0
    weights = torch.rand(tasks, generator=g, dtype=torch.float64) + 0.1
    settings = [dict(elect=False, normalize=False), dict(elect=False, normalize=True),
                dict(elect=True, normalize=True), dict(elect=True, normalize=False),
                dict(elect=True, normalize=True, weight_before_election=False)]
    whole = [fuse_deltas(deltas, weights, **s) for s in settings]
    monkeypatch.setattr(fuse, "CHUNK", 128)  # 1073 positions: 9 chunks, the last one short
    for s, expected in zip(settings, whole):
        got = fuse_deltas(deltas, weights, **s)
        assert got.shape == expected.shape and torch.equal(got.view(_INT[dtype]), expected.view(_INT[dtype])), s
    majority = fuse_deltas(deltas, weights, elect=True, normalize=True, tie_rule="majority")  # unchunked by design
    monkeypatch.setattr(fuse, "CHUNK", 1 << 20)
    assert torch.equal(majority, fuse_deltas(deltas, weights, elect=True, normalize=True, tie_rule="majority"))
