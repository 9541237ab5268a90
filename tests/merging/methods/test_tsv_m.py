"""TSV-M stage split and edge cases (the float64 references are in test_svd_methods.py)."""

from __future__ import annotations

import numpy as np
import torch

from merging.api import merge_tensors
from merging.registry import get_method
from merging.resolve import build_params
from merging.rng import generator_for
from merging.spec import TensorGroup

F64 = torch.float64


def test_every_svd_happens_in_decompose(monkeypatch):
    """combine is a product of cached factors: a lambda sweep reruns no SVD."""
    calls = []
    original = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or original(*a, **k))
    spec = get_method("tsv_m")
    params, models = build_params(spec, {}, {}, [{}] * 3, ["a", "b", "c"])
    deltas = torch.randn(3, 9, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    group = TensorGroup(name="w", base=torch.zeros(9, 6, dtype=F64), deltas=deltas, model_params=models)
    factors = spec.decompose(group, params)
    made = len(calls)
    merged = spec.combine(group, spec.sparsify(group, factors, params, generator_for(0, "w")), params)
    assert len(calls) == made and merged.shape == (9, 6)


def test_one_task_keeps_its_delta_and_more_tasks_than_rank_fall_back_to_the_mean():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(5, 4))
    base = torch.zeros(5, 4, dtype=F64)
    one = merge_tensors("tsv_m", base, [torch.tensor(d)], compute_dtype=F64).numpy()
    assert np.allclose(one, d, atol=1e-12)  # k = r: polar(U) = U, polar(V^T) = V^T
    many = [rng.normal(size=(3, 2)) for _ in range(3)]  # r = 2 < T = 3: k = 0
    out = merge_tensors("tsv_m", torch.zeros(3, 2, dtype=F64), [torch.tensor(x) for x in many], compute_dtype=F64)
    assert np.allclose(out.numpy(), np.mean(many, axis=0))
