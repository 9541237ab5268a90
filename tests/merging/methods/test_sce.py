"""SCE (FuseChat, mergekit): variance selection, energy weights, sign-consistent weighted mean."""

import pytest
import torch

from merging.api import merge_tensors

F64 = torch.float64
BASE = torch.zeros(4, dtype=F64)
D1 = torch.tensor([1.0, -2.0, 0.0, 2.0], dtype=F64)
D2 = torch.tensor([3.0, 2.0, 1.0, -2.0], dtype=F64)


def test_worked_example():
    """Energies mean(d^2): 9/4 and 18/4, so w = (1/3, 2/3). Sums (4, 0, 1, 0): every elected sign
    is + (zero mass counts as +). Entry 0: (1/3 * 1 + 2/3 * 3) / 1 = 7/3; entry 1: only d2 agrees,
    2; entry 2: d1 is zero, 1; entry 3: only d1 agrees, 2."""
    out = merge_tensors("sce", BASE, [BASE + D1, BASE + D2], compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([7 / 3, 2.0, 1.0, 2.0], dtype=F64))


def test_select_topk_keeps_the_highest_variance_positions():
    """Variances (1, 4, 1/4, 4): select_topk 0.5 keeps k = 2 positions, 1 and 3. Then both
    energies are 2 (w = 1/2 each) and each kept entry has one agreeing model: (0, 2, 0, 2)."""
    out = merge_tensors("sce", BASE, [BASE + D1, BASE + D2], params={"select_topk": 0.5}, compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([0.0, 2.0, 0.0, 2.0], dtype=F64))
    assert torch.equal(merge_tensors("sce", BASE, [BASE + D1, BASE + D2], params={"select_topk": 0.0}, compute_dtype=F64), BASE)


def test_tiny_energies_fall_back_to_equal_weights():
    """Deltas of 1e-4: the energies sum to < 1e-6, so w = (1/2, 1/2); entry 0 is then the plain
    mean 2e-4 (not 7/3 * 1e-4), as mergekit."""
    out = merge_tensors("sce", BASE, [BASE + 1e-4 * D1, BASE + 1e-4 * D2], compute_dtype=F64)
    assert torch.allclose(out, 1e-4 * torch.tensor([2.0, 2.0, 1.0, 2.0], dtype=F64))


@pytest.mark.parametrize("select_topk", [1.0, 0.35])
def test_same_as_mergekit(select_topk):
    api = pytest.importorskip("mergekit.merge_methods.api")
    base = torch.randn(16, 8, dtype=F64)
    models = [base + 0.05 * torch.randn(16, 8, dtype=F64) for _ in range(3)]
    expected = api.merge_tensors([base, *models], "sce", parameters={"select_topk": select_topk}, base_index=0)
    out = merge_tensors("sce", base, models, params={"select_topk": select_topk}, compute_dtype=F64)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14)
