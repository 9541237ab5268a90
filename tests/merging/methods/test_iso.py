"""Iso-CTS size rule edge cases (beyond test_svd_methods.py): the degenerate kt = 0 case is
Iso-C, and the capped size rule where the reference's round() would exceed the rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.api import merge_tensors
from merging.methods.iso import subspace_sizes

F64 = torch.float64


def _run(method, deltas, **params):
    base = torch.zeros(deltas[0].shape, dtype=F64)
    return merge_tensors(method, base, [torch.tensor(d) for d in deltas], params=params, compute_dtype=F64).numpy()


def _polar(x):
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u @ vh


def _iso_cts_with_sizes(deltas, kc, kt):
    """Iso-CTS (svd-methods.md §6 steps 2-5) with explicit subspace sizes, float64 numpy."""
    u, s, vh = np.linalg.svd(np.sum(deltas, axis=0), full_matrices=False)
    uc, sc, vc = u[:, :kc], s[:kc], vh[:kc]
    blocks = [np.linalg.svd(d - uc @ (uc.T @ d), full_matrices=False) for d in deltas]
    big_u = np.concatenate([b[0][:, :kt] for b in blocks] + [uc], axis=1)
    big_s = np.concatenate([b[1][:kt] for b in blocks] + [sc])
    big_v = np.concatenate([b[2][:kt] for b in blocks] + [vc], axis=0)
    return big_s.mean() * _polar(big_u) @ _polar(big_v)


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_many_tasks_on_a_small_matrix_degenerate_to_iso_c(shape):
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=shape) for _ in range(8)]  # r = 4, (r - kc) / T = 0.125 -> kt = 0
    assert subspace_sizes(4, 8, 0.8) == (4, 0)
    assert np.allclose(_run("iso_cts", deltas), _run("iso_c", deltas), atol=1e-12)


def test_size_rule_is_capped_at_the_rank():
    # r = 3, T = 2, f = 0.3: kc = 0, round(1.5) = 2 per task would need 4 > 3 dims (kc = -1)
    assert subspace_sizes(3, 2, 0.3) == (1, 1)
    assert subspace_sizes(5, 2, 0.1) == (1, 2)  # round(2.5) = 2 (half to even): not capped
    assert subspace_sizes(768, 8, 0.8) == (616, 19)
    rng = np.random.default_rng(1)
    deltas = [rng.normal(size=(5, 3)) for _ in range(2)]
    assert np.allclose(_run("iso_cts", deltas, common_space_fraction=0.3), _iso_cts_with_sizes(deltas, 1, 1), atol=1e-10)


@pytest.mark.parametrize("T", [2, 3, 8])
def test_iso_cts_wide_and_tall_with_a_zero_task_stays_finite(T):
    """A zero task's residual has no spectrum: its kt slots hold whatever null-space basis the
    SVD returns (as in the reference), so only finiteness and the isotropic norm are checked."""
    rng = np.random.default_rng(T)
    for shape in ((12, 7), (7, 12)):
        deltas = [rng.normal(size=shape) for _ in range(T - 1)] + [np.zeros(shape)]
        out = _run("iso_cts", deltas, common_space_fraction=0.5)
        assert np.isfinite(out).all()
        singular = np.linalg.svd(out, compute_uv=False)
        assert np.allclose(singular, singular[0], rtol=1e-9)  # isotropic spectrum
