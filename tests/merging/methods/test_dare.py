"""DARE: random drop with per-tensor generators, rescale conventions, determinism."""

import torch

from merging.api import merge_tensors
from merging.rng import generator_for

F64 = torch.float64


def _expected_mask(name: str, seed: int, shape, density: float, models: int):
    g = generator_for(seed, name)
    return [torch.rand(shape, generator=g, dtype=torch.float32).to(F64) < density for _ in range(models)]


def test_dare_linear_inverse_rescale_matches_independent_draws():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 8, generator=g, dtype=F64)
    models = [base + torch.randn(8, 8, generator=g, dtype=F64) for _ in range(2)]
    out = merge_tensors("dare_linear", base, models, params={"rescale": "inverse"},
                        model_params=[{"density": 0.3}] * 2, seed=7, name="w", compute_dtype=F64)
    masks = _expected_mask("w", 7, (8, 8), 0.3, 2)
    expected = base + sum((m - base) * k / 0.3 for m, k in zip(models, masks))
    assert torch.allclose(out, expected)


def test_dare_l1_rescale_keeps_l1_norm():
    base = torch.zeros(1000, dtype=F64)
    a = torch.randn(1000, dtype=F64)
    out = merge_tensors("dare_linear", base, [a], params={"rescale": True}, model_params=[{"density": 0.2}], compute_dtype=F64)
    assert torch.isclose(out.abs().sum(), a.abs().sum())
    assert abs(int((out != 0).sum()) - 200) < 60


def test_seed_and_name_determine_the_mask_not_the_call_order():
    base = torch.zeros(50)
    a = torch.randn(50)
    one = merge_tensors("dare_ties", base, [a], seed=3, name="layer.0")
    merge_tensors("dare_ties", base, [a], seed=3, name="layer.1")
    two = merge_tensors("dare_ties", base, [a], seed=3, name="layer.0")
    other = merge_tensors("dare_ties", base, [a], seed=4, name="layer.0")
    assert torch.equal(one, two)
    assert not torch.equal(one, other)


def test_density_one_is_task_arithmetic():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 4, generator=g, dtype=F64)
    models = [base + torch.randn(4, 4, generator=g, dtype=F64) for _ in range(3)]
    out = merge_tensors("dare_linear", base, models, model_params=[{"density": 1.0}] * 3, compute_dtype=F64)
    assert torch.allclose(out, base + sum(m - base for m in models))
