"""Arcee Fusion (mergekit): keep the delta entries whose |delta| x row-KL importance is an outlier
(>= median + 1.5 IQR); quartiles from a seeded sample above ``quantile_sample_size`` entries."""

import pytest
import torch

from merging.api import merge_tensors

F64 = torch.float64


def test_worked_example():
    """One row, base 0: the KL factor is one positive constant K, so importance = K |delta|.
    Sorted |delta| = 0.1 .. 0.7, 5.0 (n = 8): Q1, Q2, Q3 at floor(q * 7) = 1, 3, 5, i.e. 0.2,
    0.4, 0.6; the threshold K (0.4 + 1.5 * 0.4) = K: only the 5.0 entry is kept."""
    base = torch.zeros(8, dtype=F64)
    delta = torch.tensor([0.3, -0.1, 0.5, 0.2, -5.0, 0.7, 0.4, -0.6], dtype=F64)
    out = merge_tensors("arcee_fusion", base, [base + delta], compute_dtype=F64)
    assert torch.equal(out, torch.tensor([0, 0, 0, 0, -5.0, 0, 0, 0], dtype=F64))


def test_a_row_whose_distribution_did_not_change_is_kept_at_the_base():
    """KL is per row: a row moved by a constant (same softmax) has importance 0 everywhere."""
    base = torch.randn(2, 16, dtype=F64)
    delta = torch.cat([torch.full((1, 16), 3.0, dtype=F64), torch.randn(1, 16, dtype=F64)])
    out = merge_tensors("arcee_fusion", base, [base + delta], compute_dtype=F64)
    assert torch.allclose(out[0], base[0]) and not torch.allclose(out[1], base[1])


def test_same_as_mergekit_below_the_sample_size():
    api = pytest.importorskip("mergekit.merge_methods.api")
    base = torch.randn(64, 32, dtype=F64)
    model = base + 0.05 * torch.randn(64, 32, dtype=F64)
    expected = api.merge_tensors([base, model], "arcee_fusion", base_index=0)
    assert torch.equal(merge_tensors("arcee_fusion", base, [model], compute_dtype=F64), expected)


def test_sampled_quartiles_draw_from_the_per_tensor_generator():
    """Above the sample size: the same seed gives the same model, another seed another one,
    another tensor name another sample, and torch's global generator is never touched."""
    g = torch.Generator().manual_seed(0)  # fixed data: with some draws two samples give the same mask
    base = torch.randn(64, 64, generator=g)
    model = base + 0.1 * torch.randn(64, 64, generator=g)
    params = {"quantile_sample_size": 256}
    state = torch.get_rng_state()
    one = merge_tensors("arcee_fusion", base, [model], params=params, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(merge_tensors("arcee_fusion", base, [model], params=params, seed=1), one)
    assert not torch.equal(merge_tensors("arcee_fusion", base, [model], params=params, seed=2), one)
    assert not torch.equal(merge_tensors("arcee_fusion", base, [model], params=params, seed=1, name="other"), one)


def test_sampled_quartiles_match_exact_ones_and_mergekit_statistically():
    """A 1.1M-entry tensor, mergekit's sample of 10^6 draws: about 5.7 % of the entries are kept.
    The kept fraction of the sampled rule (ours, and mergekit's with torch's global stream) is
    within 0.2 % of the exact rule's, and fewer than 0.2 % of the entries change side."""
    api = pytest.importorskip("mergekit.merge_methods.api")
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1100, 1000, generator=generator)
    model = base + 0.02 * torch.randn(1100, 1000, generator=generator)
    exact = merge_tensors("arcee_fusion", base, [model], params={"quantile_sample_size": 2_000_000}) != base
    sampled = merge_tensors("arcee_fusion", base, [model], seed=1) != base
    torch.manual_seed(0)
    theirs = api.merge_tensors([base, model], "arcee_fusion", base_index=0) != base
    assert 0.03 < exact.double().mean() < 0.1
    for kept in (sampled, theirs):
        assert abs(kept.double().mean() - exact.double().mean()) < 0.002
        assert (kept != exact).double().mean() < 0.002
    assert (sampled != exact).any()  # the sample, not the whole tensor, set the threshold
