"""Sparsification kernels: exact keep counts, tie-breaking, outlier masks, DELLA ranks."""

import torch

from merging.kernels.sparsify import (
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
