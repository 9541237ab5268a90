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


def _reference(deltas, weights, normalize, weight_before_election, tie_rule):
    """The fusion as first written (where-based election, sign-comparison agreement mask)."""
    w = weights.to(deltas.dtype).reshape((-1,) + (1,) * (deltas.dim() - 1))
    weighted = deltas * w
    voters = weighted if weight_before_election else deltas
    mass = voters.sum(dim=0)
    if tie_rule == "positive":
        sign = torch.where(mass >= 0, 1.0, -1.0).to(deltas.dtype)
    else:
        sign = torch.where(torch.sign(mass) == 0, torch.sign(torch.sign(mass).sum()), torch.sign(mass))
    mask = (torch.sign(voters) == sign.unsqueeze(0)) & (voters != 0)
    merged = (weighted * mask).sum(dim=0)
    if normalize:
        divisor = (w * mask).sum(dim=0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_election_and_agreement_match_the_first_formulation(dtype):
    g = torch.Generator().manual_seed(3)
    for tasks in (1, 2, 3):
        deltas = torch.randn(tasks, 40, 30, generator=g, dtype=torch.float64).to(dtype)
        deltas[deltas.abs() < 0.7] = 0.0
        deltas[:, :2] = -0.0  # zero mass, negative zeros
        deltas[:, 5] = torch.tensor([1.0, -1.0, 0.0][:tasks], dtype=dtype).reshape(-1, 1)  # cancelling mass
        weights = torch.tensor([1.0, 1.0, 0.5][:tasks], dtype=torch.float64)
        for normalize in (True, False):
            for before in (True, False):
                for rule in ("positive", "majority"):
                    got = fuse_deltas(deltas, weights, elect=True, normalize=normalize, weight_before_election=before,
                                      tie_rule=rule)
                    expected = _reference(deltas, weights, normalize, before, rule)
                    assert torch.equal(got.view(_INT[dtype]), expected.view(_INT[dtype])), (tasks, normalize, before, rule)
