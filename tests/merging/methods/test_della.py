"""DELLA: rank-based keep probabilities, independent draws, validation of the window."""

import pytest
import torch

from merging.api import merge_tensors
from merging.errors import MergeConfigError
from merging.rng import generator_for

F64 = torch.float64


def test_della_linear_inverse_matches_independent_computation():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 6, generator=g, dtype=F64)
    delta = torch.randn(3, 6, generator=g, dtype=F64)
    out = merge_tensors("della_linear", base, [base + delta], params={"rescale": "inverse"},
                        model_params=[{"density": 0.5, "epsilon": 0.2}], seed=1, name="m", compute_dtype=F64)
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).to(F64)
    q = 0.3 + 0.4 * ranks / 5
    u = torch.rand((3, 6), generator=generator_for(1, "m"), dtype=torch.float32).to(F64)
    expected = base + torch.where(u < q, delta / q, torch.zeros_like(delta))
    assert torch.allclose(out, expected)


def test_window_outside_unit_interval_is_rejected_naming_fields():
    with pytest.raises(MergeConfigError, match="density"):
        merge_tensors("della", torch.zeros(3), [torch.ones(3)], model_params=[{"density": 0.9, "epsilon": 0.2}])


def test_density_one_della_is_ties_without_trim():
    base = torch.zeros(3, dtype=F64)
    a, b = torch.tensor([1.0, -1.0, 2.0], dtype=F64), torch.tensor([3.0, 2.0, -1.0], dtype=F64)
    out = merge_tensors("della", base, [a, b], model_params=[{"density": 1.0}] * 2, compute_dtype=F64)
    assert torch.allclose(out, torch.tensor([2.0, 2.0, 2.0], dtype=F64))
