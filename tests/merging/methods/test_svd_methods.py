"""TSV-M, Iso-C, Iso-CTS and Scale-SVD against independent float64 numpy implementations
written from svd-methods.md (T from 2 to 8, tall and wide matrices, zero deltas), plus
invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.api import merge_tensors
from merging.methods.iso import subspace_sizes
from merging.methods.scale_svd import low_rank_plus_sparse

F64 = torch.float64
SHAPES = [(8, 5), (5, 9), (6, 6)]


def _np_polar(x):
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u @ vh


def np_tsv_m(deltas):
    T = len(deltas)
    m, n = deltas[0].shape
    k = min(m, n) // T
    if k == 0:
        return np.mean(deltas, axis=0)
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k])
    return _np_polar(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ _np_polar(np.concatenate(vs, 0))


def np_iso_c(deltas):
    u, s, vh = np.linalg.svd(np.sum(deltas, axis=0), full_matrices=False)
    return s.mean() * u @ vh


def np_iso_cts(deltas, f):
    T = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    kc = int(np.floor(r * f))
    K = min(round((r - kc) / T), r // T) * T  # capped: the reference fails when K > r
    kc, kt = r - K, K // T
    if kt == 0:
        return np_iso_c(deltas)
    u, s, vh = np.linalg.svd(np.sum(deltas, axis=0), full_matrices=False)
    uc, sc, vc = u[:, :kc], s[:kc], vh[:kc]
    us, ss, vs = [], [], []
    for d in deltas:
        ru, rs, rvh = np.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        us.append(ru[:, :kt]), ss.append(rs[:kt]), vs.append(rvh[:kt])
    U = np.concatenate(us + [uc], 1)
    S = np.concatenate(ss + [sc])
    V = np.concatenate(vs + [vc], 0)
    return S.mean() * _np_polar(U) @ _np_polar(V)


def _run(method, deltas, base=None, **params):
    base = np.zeros_like(deltas[0]) if base is None else base
    out = merge_tensors(method, torch.tensor(base), [torch.tensor(base + d) for d in deltas], params=params, compute_dtype=F64)
    return out.numpy() - base


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_m(T, shape):
    rng = np.random.default_rng(T + shape[0])
    deltas = [rng.normal(size=shape) for _ in range(T)]
    assert np.allclose(_run("tsv_m", deltas), np_tsv_m(deltas), atol=1e-10)
    assert np.allclose(_run("tsv_m", deltas, **{"lambda": 0.5}), 0.5 * np_tsv_m(deltas), atol=1e-10)


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_and_iso_cts(T, shape):
    rng = np.random.default_rng(10 * T + shape[1])
    deltas = [rng.normal(size=shape) for _ in range(T)]
    assert np.allclose(_run("iso_c", deltas), np_iso_c(deltas), atol=1e-10)
    for f in (0.8, 0.5, 0.2):
        assert np.allclose(_run("iso_cts", deltas, common_space_fraction=f), np_iso_cts(deltas, f), atol=1e-10)


def test_iso_cts_sizes_follow_the_papers_examples():
    assert subspace_sizes(768, 8, 0.8) == (616, 19)
    assert subspace_sizes(768, 14, 0.8) == (614, 11)
    assert subspace_sizes(768, 20, 0.8) == (608, 8)
    assert subspace_sizes(10, 8, 0.8) == (10, 0)  # (r - kc) / T <= 0.5: degenerates to Iso-C


def test_iso_c_frobenius_norm_and_non_matrix_mean():
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=(6, 4)) for _ in range(3)]
    merged = _run("iso_c", deltas)
    s = np.linalg.svd(np.sum(deltas, axis=0), compute_uv=False)
    assert np.isclose(np.linalg.norm(merged), s.mean() * np.sqrt(4))
    vectors = [rng.normal(size=5) for _ in range(3)]
    for method in ("tsv_m", "iso_c", "iso_cts"):
        assert np.allclose(_run(method, vectors), np.mean(vectors, axis=0))


def test_zero_deltas_stay_zero():
    for method in ("tsv_m", "iso_c", "iso_cts"):
        assert np.allclose(_run(method, [np.zeros((5, 4))] * 3), 0)


def test_tsv_m_is_invariant_to_svd_sign_flips(monkeypatch):
    rng = np.random.default_rng(4)
    deltas = [rng.normal(size=(6, 5)) for _ in range(2)]
    plain = _run("tsv_m", deltas)
    original = torch.linalg.svd

    def flipped(x, full_matrices=True):
        u, s, vh = original(x, full_matrices=full_matrices)
        signs = torch.where(torch.arange(s.shape[-1]) % 2 == 0, 1.0, -1.0).to(u.dtype)
        return u * signs.unsqueeze(-2), s, vh * signs.unsqueeze(-1)

    monkeypatch.setattr(torch.linalg, "svd", flipped)
    assert np.allclose(_run("tsv_m", deltas), plain, atol=1e-10)
    assert np.allclose(_run("iso_cts", deltas), np_iso_cts(deltas, 0.8), atol=1e-10)


def np_lps(w, a, kappa, rho, iters, mask):
    d_out, d_in = w.shape
    root = np.sqrt(a)
    ws = w * root
    k = min(max(1, int(np.floor(kappa * (1 - rho) * d_out * d_in / (d_out + d_in)))), min(d_out, d_in))
    u_frac = 1 - (1 - kappa) * (1 - rho)
    S = np.zeros_like(ws)
    for _ in range(iters):
        U, s, Vh = np.linalg.svd(ws - S, full_matrices=False)
        L = (U[:, :k] * s[:k]) @ Vh[:k]
        S = ws - L
        if mask == "row":
            drop = int(np.floor(u_frac * d_in))
            for i in range(d_out):
                S[i, np.argsort(np.abs(S[i]), kind="stable")[:drop]] = 0
        else:
            drop = int(np.floor(u_frac * S.size))
            flat = S.ravel()
            flat[np.argsort(np.abs(flat), kind="stable")[:drop]] = 0
            S = flat.reshape(S.shape)
    return (L + S) / root


@pytest.mark.parametrize("mask", ["row", "global"])
@pytest.mark.parametrize("shape", [(9, 6), (5, 12)])
def test_low_rank_plus_sparse_matches_independent_implementation(mask, shape):
    rng = np.random.default_rng(shape[0])
    w = rng.normal(size=shape)
    a = rng.uniform(0.1, 3.0, size=shape[1])
    got = low_rank_plus_sparse(torch.tensor(w), torch.tensor(a), 0.6, 0.2, 5, mask).numpy()
    assert np.allclose(got, np_lps(w, a, 0.6, 0.2, 5, mask), atol=1e-10)


def test_low_rank_plus_sparse_reproduces_a_low_rank_input():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 2)) @ rng.normal(size=(2, 7))  # rank 2 <= k
    got = low_rank_plus_sparse(torch.tensor(w), None, 0.75, 0.1, 3, "row").numpy()
    assert np.allclose(got, w, atol=1e-10)


def test_scale_svd_sum_and_iso_modes():
    rng = np.random.default_rng(2)
    deltas = [rng.normal(size=(6, 6)) for _ in range(3)]
    cleaned = [np_lps(d, np.ones(6), 0.75, 0.1, 10, "row") for d in deltas]
    assert np.allclose(_run("scale_svd", deltas, merge="sum"), np.sum(cleaned, axis=0), atol=1e-9)
    assert np.allclose(_run("scale_svd", deltas, merge="iso_c"), np_iso_c(cleaned), atol=1e-9)
    assert np.allclose(_run("scale_svd", deltas), np_iso_cts(cleaned, 0.8), atol=1e-9)
