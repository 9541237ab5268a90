"""SVD kernels: thin SVD dtypes and batching, the strict relative rank cut, the polar factor."""

import pytest
import torch

from merging.kernels.svd import polar, relative_rank, thin_svd

F64 = torch.float64


@pytest.mark.parametrize("shape", [(7, 4), (4, 9), (3, 5, 6)])
def test_thin_svd_reconstructs_and_is_thin(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    u, s, vh = thin_svd(x)
    p = min(shape[-2:])
    assert u.shape[-1] == p and s.shape[-1] == p and vh.shape[-2] == p
    assert torch.allclose((u * s.unsqueeze(-2)) @ vh, x, atol=1e-12)
    assert (s[..., :-1] >= s[..., 1:]).all()


def test_thin_svd_dtypes():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    assert thin_svd(x)[1].dtype == torch.float32
    assert thin_svd(x, F64)[1].dtype == F64
    assert thin_svd(x.to(torch.bfloat16))[1].dtype == torch.float32  # no half-precision SVD
    assert thin_svd(x.to(F64))[1].dtype == F64


def test_relative_rank_is_strict_and_zero_for_zero_spectrum():
    s = torch.tensor([2.0, 1.0, 0.02, 0.01], dtype=F64)
    assert relative_rank(s, 1e-2) == 2  # strict: 0.02 is not > 0.01 * 2.0
    assert relative_rank(torch.tensor([2.0, 1.0, 0.021, 0.019], dtype=F64), 1e-2) == 3
    assert relative_rank(s, 0.0) == 4
    assert relative_rank(torch.zeros(3, dtype=F64), 1e-2) == 0
    assert relative_rank(torch.zeros(0, dtype=F64), 1e-2) == 0


@pytest.mark.parametrize("shape", [(8, 3), (3, 8), (4, 4)])
def test_polar_is_the_nearest_orthonormal_factor(shape):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    q = polar(a)
    assert q.shape == a.shape and q.dtype == a.dtype
    small = min(shape)
    gram = q.T @ q if shape[0] >= shape[1] else q @ q.T
    assert torch.allclose(gram, torch.eye(small, dtype=F64), atol=1e-12)
    if shape[0] >= shape[1]:  # full column rank: A (A^T A)^(-1/2)
        evals, evecs = torch.linalg.eigh(a.T @ a)
        assert torch.allclose(q, a @ (evecs * evals.rsqrt()) @ evecs.T, atol=1e-10)


def test_polar_ignores_svd_sign_conventions_and_zero_columns():
    a = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    signs = torch.tensor([1.0, -1.0, -1.0], dtype=F64)
    assert torch.allclose(polar(a * signs), polar(a) * signs, atol=1e-12)  # polar(A S) = polar(A) S
    padded = polar(torch.cat([a, torch.zeros(6, 2, dtype=F64)], dim=1))
    assert torch.allclose(padded[:, :3], polar(a), atol=1e-12)  # TSV-M's empty slots change nothing


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (2, 5, 3)])
def test_thin_svd_falls_back_to_gesvd_when_gesdd_does_not_converge(monkeypatch, shape):
    torch.manual_seed(0)
    a = torch.randn(*shape, dtype=torch.float32)
    expected_s = torch.linalg.svd(a.double(), full_matrices=False).S
    real_svd = torch.linalg.svd

    def gesdd_fails(matrix, *args, **kwargs):
        if kwargs.get("driver") is None:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", gesdd_fails)
    u, s, vh = thin_svd(a)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert u.shape == (*shape[:-2], shape[-2], min(shape[-2:])) and vh.shape == (*shape[:-2], min(shape[-2:]), shape[-1])
    torch.testing.assert_close(s.double(), expected_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, a, rtol=1e-4, atol=1e-5)
