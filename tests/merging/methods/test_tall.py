"""TALL masks and Consensus Merging against hand-computed masks and an independent numpy
implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.api import merge_tensors
from merging.errors import MergeConfigError

F64 = torch.float64


def _run(method, deltas, params=None, lambdas=None):
    deltas = [torch.as_tensor(d, dtype=F64) for d in deltas]
    base = torch.zeros_like(deltas[0])
    model_params = [{"tall_lambda": lam} for lam in (lambdas or [0.4] * len(deltas))]
    return merge_tensors(method, base, deltas, params=params or {}, model_params=model_params, compute_dtype=F64).numpy()


def test_consensus_by_hand():
    a = np.array([1.0, 0.1, -2.0, 0.5])
    b = np.array([1.0, -0.1, 0.1, 0.5])
    # tau_MTL = (2, 0, -1.9, 1); |tau_MTL - a| = (1, 0.1, 0.1, 0.5); |tau_MTL - b| = (1, 0.1, 2.0, 0.5)
    # lambda 0.5: m_a = (1 > .5, .1 > .05, 2 > .05, .5 > .25) = all; m_b = (1, 1, .1 > 1.0 no, 1)
    # counts (2, 2, 1, 2) -> k = 2 keeps (2, 0, 0, 1)
    out = _run("consensus", [a, b], {"k": 2}, [0.5, 0.5])
    assert np.allclose(out, [2.0, 0.0, 0.0, 1.0])
    union = _run("tall_masks", [a, b], {}, [0.5, 0.5])
    assert np.allclose(union, [2.0, 0.0, -1.9, 1.0])
    only_b = _run("tall_masks", [a, b], {"task_index": 1}, [0.5, 0.5])
    assert np.allclose(only_b, [2.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("T", [2, 4, 6])
def test_consensus_matches_independent_implementation(T):
    rng = np.random.default_rng(T)
    deltas = [rng.normal(size=(5, 7)) for _ in range(T)]
    lambdas = rng.choice([0.2, 0.3, 0.4, 0.5, 0.6], size=T).tolist()
    mtl = np.sum(deltas, axis=0)
    masks = [np.abs(d) > lam * np.abs(mtl - d) for d, lam in zip(deltas, lambdas)]
    for k in (0, 1, 2, T, T + 1):
        expected = mtl * (np.sum(masks, axis=0) >= k)
        assert np.allclose(_run("consensus", deltas, {"k": k}, lambdas), expected)


def test_ties_multitask_vector_variant():
    rng = np.random.default_rng(9)
    deltas = [rng.normal(size=(4, 5)) for _ in range(3)]
    trimmed = []
    for d in deltas:
        t = np.zeros_like(d).ravel()
        idx = np.argsort(-np.abs(d).ravel(), kind="stable")[: int(0.4 * d.size)]
        t[idx] = d.ravel()[idx]
        trimmed.append(t.reshape(d.shape))
    trimmed = np.stack(trimmed)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    mtl = (trimmed * ((np.sign(trimmed) == sign) & (trimmed != 0))).sum(0)
    masks = [np.abs(d) > 0.4 * np.abs(mtl - d) for d in deltas]
    expected = mtl * (np.sum(masks, axis=0) >= 2)
    assert np.allclose(_run("consensus", deltas, {"mtl": "ties", "ties_density": 0.4}), expected)


def test_task_index_out_of_range():
    with pytest.raises(MergeConfigError, match="task_index 5"):
        _run("tall_masks", [np.ones(3), np.ones(3)], {"task_index": 5})
