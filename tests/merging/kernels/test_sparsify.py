"""Sparsification kernels: exact keep counts, tie-breaking, outlier masks, DELLA ranks."""

import pytest
import torch

from merging.kernels import sparsify
from merging.kernels.sparsify import (
    _exact_topk_mask,
    drop_outliers_and_small,
    keep_topk,
    keep_topk_rows,
    magprune_rank_probabilities,
    rescale_to_norm,
    trim_below,
)


def test_keep_topk_hand_example():
    x = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.1], dtype=torch.float64)
    assert torch.equal(keep_topk(x, 2), torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0], dtype=torch.float64))


def test_keep_topk_exact_count_with_ties_breaks_by_index():
    x = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    out = keep_topk(x, 2)
    assert torch.equal(out, torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    for k in range(0, 6):
        assert int((keep_topk(x, k) != 0).sum()) == k


def test_keep_topk_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [-5.0, 0.1, 4.0]], dtype=torch.float64)
    assert torch.equal(keep_topk_rows(x, 1), torch.tensor([[0, 0, 3.0], [-5.0, 0, 0]], dtype=torch.float64))


def test_trim_below_keeps_ties_at_threshold():
    x = torch.tensor([0.2, -0.5, 0.5, 0.1], dtype=torch.float64)
    tau = torch.tensor(0.5, dtype=torch.float64)  # the 3rd smallest |x| of 0.1, 0.2, 0.5, 0.5
    assert torch.equal(trim_below(x, tau), torch.tensor([0.0, -0.5, 0.5, 0.0], dtype=torch.float64))


def test_breadcrumbs_mask_drops_outliers_and_smallest():
    x = torch.arange(1, 11, dtype=torch.float64)  # |x| = 1..10
    out = drop_outliers_and_small(x, density=0.5, gamma=0.2)  # drop top 2 (9, 10), keep 5: 4..8
    assert torch.equal(out != 0, (x >= 4) & (x <= 8))


def test_breadcrumbs_shrinks_outlier_cut_to_meet_density():
    x = torch.arange(1, 11, dtype=torch.float64)
    out = drop_outliers_and_small(x, density=0.9, gamma=0.2)  # keep 9: only 1 outlier dropped
    assert torch.equal(out != 0, (x >= 1) & (x <= 9))


def test_breadcrumbs_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]], dtype=torch.float64)
    out = drop_outliers_and_small(x, density=0.5, gamma=0.25, per_row=True)
    assert torch.equal(out != 0, torch.tensor([[False, True, True, False], [False, True, True, False]]))


def test_magprune_probabilities_rank_linear():
    x = torch.tensor([[0.3, -0.1, 0.2]], dtype=torch.float64)
    probs = magprune_rank_probabilities(x, density=0.5, epsilon=0.1)
    # ranks by |x|: 0.1 -> 0, 0.2 -> 1, 0.3 -> 2; q = 0.4 + 0.2 * rank / 2
    assert torch.allclose(probs, torch.tensor([[0.6, 0.4, 0.5]], dtype=torch.float64))
    one_d = magprune_rank_probabilities(x[0], density=0.5, epsilon=0.1)
    assert torch.allclose(one_d, probs[0])


def test_rescale_l1():
    original = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    masked = torch.tensor([0.0, -2.0, 0.0], dtype=torch.float64)
    assert torch.allclose(rescale_to_norm(original, masked, "l1"), torch.tensor([0.0, -6.0, 0.0], dtype=torch.float64))
    assert torch.equal(rescale_to_norm(original, torch.zeros(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))


_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _kthvalue_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The previous whole-tensor selection, kept as the reference: kthvalue's threshold, then the
    first ``need`` ties by index (cumsum of the tied entries)."""
    n = magnitudes.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0)
    threshold = torch.kthvalue(magnitudes, n - k + 1).values
    above, tied = magnitudes > threshold, magnitudes == threshold
    return above | (tied & (torch.cumsum(tied.to(torch.int64), 0) <= k - above.sum()))


def _tied_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Few distinct magnitudes (many ties), both signs, zeros of both signs, tiny and huge values."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 1e-30, 2.5e-8, 0.125, 0.5, 1.0, 3.0, 1e20], dtype=torch.float64)
    values = levels[torch.randint(len(levels), (n,), generator=g)]
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return (values * signs).to(dtype)  # -1 * 0.0 gives -0.0


@pytest.fixture
def radix_everywhere(monkeypatch):
    """The radix select on every size (it serves tensors of 65,536 entries and more), in chunks of
    512 entries, on one torch thread as in a merge (thread wake-ups dominate tiny histograms on a
    busy machine)."""
    monkeypatch.setattr(sparsify, "RADIX_MIN", 1)
    monkeypatch.setattr(sparsify, "CHUNK", 512)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_selection_gives_the_kthvalue_mask_with_ties(dtype, radix_everywhere):
    g = torch.Generator().manual_seed(1)
    cases = [_tied_values(n, dtype, seed) for seed, n in enumerate((1, 2, 7, 100, 1500))]
    cases.append((torch.randn(2000, generator=g, dtype=torch.float64) * 0.01).to(torch.bfloat16).to(dtype))  # bf16 ties
    cases.append(torch.randn(1000, generator=g, dtype=torch.float64).to(dtype))  # continuous
    cases.append(torch.zeros(50, dtype=dtype))
    cases.append(torch.randn(70_000, generator=g, dtype=torch.float64).to(torch.bfloat16).to(dtype))  # above RADIX_MIN
    for x in cases:
        n = x.numel()
        for k in sorted({0, 1, n // 3, n - 1, n, max(1, int(0.3 * n))}):
            expected = _kthvalue_mask(x.abs(), k)
            assert torch.equal(_exact_topk_mask(x.abs(), k), expected), (n, k)
            kept = keep_topk(x, k)
            assert torch.equal(kept.view(_INT[dtype]), (x * expected).view(_INT[dtype])), (n, k)  # -0.0 kept as such


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_breadcrumbs_whole_tensor_equals_the_kthvalue_route(dtype, radix_everywhere):
    for seed in range(2):
        x = _tied_values(999, dtype, seed).reshape(27, 37)
        for density, gamma in ((0.9, 0.01), (0.5, 0.2), (0.99, 0.3)):
            flat = drop_outliers_and_small(x, density, gamma)
            # one row through the per-row route is the whole tensor through kthvalue
            reference = drop_outliers_and_small(x.reshape(1, -1), density, gamma, per_row=True).reshape(x.shape)
            assert torch.equal(flat.view(_INT[dtype]), reference.view(_INT[dtype]))


def test_keep_topk_writes_into_out(radix_everywhere):
    x = _tied_values(64, torch.float32, 5).reshape(8, 8)
    out = torch.full_like(x, 7.0)
    assert keep_topk(x, 10, out=out) is out
    assert torch.equal(out, keep_topk(x, 10))
