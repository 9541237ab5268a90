"""RAM+ tensor-local (mergekit ramplus_tl): RAM with unique entries scaled by 1 + r clamp(rho, 0, alpha)."""

import pytest
import torch

from merging.api import merge_tensors

F64 = torch.float64
BASE = torch.zeros(4, dtype=F64)
MODELS = [torch.tensor(v, dtype=F64) for v in ([1.0, 0.05, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.5])]


def test_worked_example():
    """epsilon 0.1 (as in test_ram): models 1 and 3 each share one entry (entry 0) and own one
    (entries 2 and 3), so rho = 1; model 2 owns none. r = 0.5: with alpha 2 the unique entries are
    scaled by 1.5, with alpha 0.2 by 1.1; shared entries are RAM's mean."""
    out = merge_tensors("ramplus_tl", BASE, MODELS, params={"epsilon": 0.1, "r": 0.5, "alpha": 2.0}, compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([1.0, 0.0, 3.0, 0.75], dtype=F64))
    capped = merge_tensors("ramplus_tl", BASE, MODELS, params={"epsilon": 0.1, "r": 0.5, "alpha": 0.2}, compute_dtype=F64)
    assert torch.allclose(capped, torch.tensor([1.0, 0.0, 2.2, 0.55], dtype=F64))


def test_r_zero_is_ram():
    base = torch.randn(8, 8, dtype=F64)
    models = [base + 0.02 * torch.randn(8, 8, dtype=F64) for _ in range(3)]
    ram = merge_tensors("ram", base, models, params={"epsilon": 0.02}, compute_dtype=F64)
    assert torch.allclose(merge_tensors("ramplus_tl", base, models, params={"epsilon": 0.02, "r": 0.0}, compute_dtype=F64), ram)


def test_epsilon_zero_with_an_unchanged_model_stays_finite():
    """epsilon 0 and a model identical to the base: mergekit's ratio is 0/0 and its whole tensor
    NaN. Here that model's (unused) scale is finite; the other model owns both entries, rho = 0."""
    changed = BASE + torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=F64)
    out = merge_tensors("ramplus_tl", BASE, [BASE.clone(), changed], params={"epsilon": 0.0, "r": 0.5, "alpha": 0.2}, compute_dtype=F64)
    assert torch.equal(out, changed)


def test_same_as_mergekit():
    api = pytest.importorskip("mergekit.merge_methods.api")
    base = torch.randn(16, 8, dtype=F64)
    models = [base + 0.02 * torch.randn(16, 8, dtype=F64) for _ in range(3)]
    params = {"epsilon": 0.02, "r": 0.3, "alpha": 0.5}
    expected = api.merge_tensors([base, *models], "ramplus_tl", parameters=params, base_index=0)
    out = merge_tensors("ramplus_tl", base, models, params=params, compute_dtype=F64)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14)
