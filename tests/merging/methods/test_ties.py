"""TIES: trim, elect, disjoint merge; mergekit's and the paper's conventions."""

import numpy as np
import pytest
import torch

from merging.api import merge_tensors

F64 = torch.float64


def test_hand_example_mergekit_convention():
    base = torch.zeros(4, dtype=F64)
    a = torch.tensor([0.5, -0.1, 2.0, -1.0], dtype=F64)
    b = torch.tensor([-0.4, 0.3, 1.0, 0.2], dtype=F64)
    out = merge_tensors("ties", base, [a, b], model_params=[{"density": 0.5}, {"density": 0.5}], compute_dtype=F64)
    # trim (top 2): a -> (0.5, 0, 2, -1) -> keep |2|, |-1| = (0, 0, 2, -1); b -> (-0.4, 0, 1, 0)
    # mass: (-0.4, 0, 3, -1) -> sign (-, +, +, -); kept: a(0,0,2,-1), b(-0.4,0,1,0)
    # disjoint mean: (-0.4, 0, 1.5, -1)
    assert torch.allclose(out, torch.tensor([-0.4, 0.0, 1.5, -1.0], dtype=F64))


def test_weights_change_the_vote_in_mergekit_mode_but_not_in_paper_mode():
    base = torch.zeros(1, dtype=F64)
    a, b = torch.tensor([1.0], dtype=F64), torch.tensor([-2.0], dtype=F64)
    weights = [{"weight": 3.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    mk = merge_tensors("ties", base, [a, b], model_params=weights, compute_dtype=F64)
    assert torch.allclose(mk, torch.tensor([1.0], dtype=F64))  # weighted mass 3 - 2 > 0: keep a; 3*1/3
    paper = merge_tensors("ties", base, [a, b], params={"weight_before_election": False}, model_params=weights, compute_dtype=F64)
    assert torch.allclose(paper, torch.tensor([-2.0], dtype=F64))  # unweighted mass -1: keep b; 1*-2/1


def _paper_ties(flat: np.ndarray, k: float) -> np.ndarray:
    """Independent float64 TIES over flattened task vectors (T, D), FusionBench semantics."""
    T, D = flat.shape
    trimmed = flat.copy()
    for t in range(T):
        kth = D - int(np.floor(D * k))
        tau = np.sort(np.abs(flat[t]))[kth - 1]
        trimmed[t][np.abs(flat[t]) < tau] = 0
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    keep = (np.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * keep).sum(0) / np.maximum(keep.sum(0), 1)


@pytest.mark.parametrize("T", [2, 3, 5])
def test_paper_mode_matches_independent_implementation(T):
    rng = np.random.default_rng(T)
    base = rng.normal(size=(6, 7))
    models = [base + rng.normal(size=(6, 7)) for _ in range(T)]
    out = merge_tensors(
        "ties", torch.tensor(base), [torch.tensor(m) for m in models],
        params={"trim_scope": "model", "weight_before_election": False, "sign_tie_rule": "majority"},
        model_params=[{"density": 0.3}] * T, compute_dtype=F64,
    )
    expected = base + _paper_ties(np.stack([m - base for m in models]).reshape(T, -1), 0.3).reshape(6, 7)
    assert np.allclose(out.numpy(), expected, atol=1e-12)


def test_one_model_nothing_pruned_returns_its_delta():
    base = torch.randn(4, 4, dtype=F64)
    a = torch.randn(4, 4, dtype=F64)
    out = merge_tensors("ties", base, [a], model_params=[{"density": 1.0}], compute_dtype=F64)
    assert torch.allclose(out, a)


def test_keep_count_is_exact_per_tensor():
    base = torch.zeros(10, 10, dtype=F64)
    a = torch.randn(10, 10, dtype=F64)
    out = merge_tensors("ties", base, [a], model_params=[{"density": 0.37}], compute_dtype=F64)
    assert int((out != 0).sum()) == 37
