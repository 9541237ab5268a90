"""Sign election and disjoint aggregation (TIES), both tie conventions."""

import torch

from merging.kernels.sign import agreement_mask, disjoint_mean, elect_sign


def test_majority_rule_example_from_drm_spec():
    """drm.md §1.5: columns (1,-1), (-2,1), (3,0) -> (0,0), (-2,0), (3,0)."""
    x = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 1.0, 0.0]], dtype=torch.float64)
    sign = elect_sign(x, "majority")
    # mass: 0, -1, 3 -> signs 0, -1, +1; global majority sign(0 - 1 + 1) = 0: position 0 keeps 0
    assert torch.equal(sign, torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64))
    kept = x * agreement_mask(x, sign)
    assert torch.equal(kept, torch.tensor([[0.0, -2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64))


def test_majority_fill_uses_tensor_majority():
    x = torch.tensor([[1.0, 2.0, 5.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(elect_sign(x, "majority"), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))


def test_positive_rule_zero_mass_is_plus():
    x = torch.tensor([[1.0, -2.0], [-1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(elect_sign(x, "positive"), torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_disjoint_mean_counts_only_kept():
    x = torch.tensor([[2.0, 0.0, -1.0], [4.0, 0.0, 3.0]], dtype=torch.float64)
    sign = elect_sign(x, "majority")
    mask = agreement_mask(x, sign)
    assert torch.equal(disjoint_mean(x, mask), torch.tensor([3.0, 0.0, 3.0], dtype=torch.float64))
    assert torch.equal(disjoint_mean(x), torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64))
