"""Scale-SVD with activation statistics through the stages, against an independent float64
numpy OATS; the identity when the sparse budget keeps every entry; the statistics shape check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merging.api import merge_tensors, run_stages
from merging.errors import MergeConfigError
from merging.registry import get_method
from merging.resolve import build_params
from merging.spec import TensorGroup

F64 = torch.float64


def np_oats(w, a, kappa, rho, iterations, mask):
    """OATS L + S in the sqrt(a)-scaled space (svd-methods.md §12), unscaled at the end."""
    m, n = w.shape
    col = np.sqrt(a)[None, :]
    target = w * col
    rank = min(m, n, max(1, math.floor(kappa * (1 - rho) * m * n / (m + n))))
    pruned = 1 - (1 - kappa) * (1 - rho)
    sparse = np.zeros_like(target)
    for _ in range(iterations):
        u, s, vh = np.linalg.svd(target - sparse, full_matrices=False)
        low = u[:, :rank] @ np.diag(s[:rank]) @ vh[:rank]
        sparse = target - low
        if mask == "row":
            drop = math.floor(pruned * n)
            for row in sparse:
                row[np.argsort(np.abs(row), kind="stable")[:drop]] = 0.0
        else:
            drop = math.floor(pruned * m * n)
            order = np.argsort(np.abs(sparse), axis=None, kind="stable")[:drop]
            sparse[np.unravel_index(order, sparse.shape)] = 0.0
    return (low + sparse) / col


def _stages(deltas, stats, **params):
    spec = get_method("scale_svd")
    p, models = build_params(spec, params, {}, [{}] * len(deltas), [f"m{i}" for i in range(len(deltas))])
    d = torch.stack([torch.tensor(x) for x in deltas])
    group = TensorGroup(name="layer.weight", base=torch.zeros_like(d[0]), deltas=d, model_params=models, kind="matrix",
                        stats=None if stats is None else torch.tensor(stats))
    return run_stages(spec, group, p, seed=0).numpy()


@pytest.mark.parametrize("mask", ["row", "global"])
@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
@pytest.mark.parametrize("T", [2, 5])
def test_scaled_cleaning_matches_independent_oats_through_the_stages(mask, shape, T):
    rng = np.random.default_rng(T * 10 + shape[0])
    deltas = [rng.normal(size=shape) for _ in range(T)]
    stats = rng.uniform(0.05, 4.0, size=shape[1])  # per-input-feature second moments
    params = {"merge": "sum", "mask": mask, "rank_ratio": 0.5, "sparsity": 0.2, "iterations": 4}
    expected = sum(np_oats(d, stats, 0.5, 0.2, 4, mask) for d in deltas)
    assert np.allclose(_stages(deltas, stats, **params), expected, atol=1e-10)
    unscaled = sum(np_oats(d, np.ones(shape[1]), 0.5, 0.2, 4, mask) for d in deltas)
    assert np.allclose(_stages(deltas, None, **params), unscaled, atol=1e-10)
    assert not np.allclose(expected, unscaled)  # the statistics matter


def test_sparse_budget_keeping_everything_returns_the_input():
    """rho = 0, tiny kappa: floor(u n) = 0 entries pruned, so S = W~ - L and L + S = W~."""
    rng = np.random.default_rng(3)
    deltas = [rng.normal(size=(7, 12)) for _ in range(3)]
    stats = rng.uniform(0.1, 2.0, size=12)
    out = _stages(deltas, stats, merge="sum", rank_ratio=0.01, sparsity=0.0)
    assert np.allclose(out, np.sum(deltas, axis=0), atol=1e-12)
    one = merge_tensors("scale_svd", torch.zeros(7, 12, dtype=F64), [torch.tensor(deltas[0])],
                        params={"merge": "sum", "rank_ratio": 0.01, "sparsity": 0.0}, compute_dtype=F64)
    assert np.allclose(one.numpy(), deltas[0], atol=1e-12)


def test_statistics_of_the_wrong_shape_name_the_tensor():
    deltas = [np.ones((4, 3)), np.ones((4, 3))]
    with pytest.raises(MergeConfigError, match=r"layer\.weight.*\(4,\).*expected \(3,\)"):
        _stages(deltas, np.ones(4))
