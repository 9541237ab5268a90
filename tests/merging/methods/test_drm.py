"""DRM-H / DRM-V: every number of drm.md §4, an independent float64 numpy implementation
(written from the spec) on random cases, invariants, guards and the reference mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.api import merge_tensors
from merging.methods import drm
from merging.registry import get_method
from merging.resolve import build_params
from merging.rng import generator_for
from merging.spec import TensorGroup

F64 = torch.float64
D1 = [[0.5, -1.2, 0.3], [0.8, 0.1, -0.7], [-0.4, 0.9, 0.6], [1.1, -0.2, 0.4]]
D2 = [[-0.3, 0.7, 0.9], [0.6, -0.5, 0.2], [0.1, 1.0, -0.8], [-0.9, 0.4, 0.5]]


def _merge(deltas, coefficients=None, **params):
    deltas = [torch.as_tensor(d, dtype=F64) for d in deltas]
    base = torch.zeros_like(deltas[0])
    model_params = [{"coefficient": c} for c in (coefficients or [1.0] * len(deltas))]
    return merge_tensors("drm", base, deltas, params={"svd_dtype": "float64", **params}, model_params=model_params,
                         compute_dtype=F64).numpy()


# drm.md §4, outputs to 4 decimals
WORKED = {
    ("horizontal", (1, 1), 0.5, True): [[0.6778, -0.6046, 1.1811], [0.7917, -0.2971, -0.6359], [-0.1467, 1.9211, -0.0141], [1.0989, 0.0168, 0.9895]],
    ("horizontal", (1, 0.5), 0.5, True): [[0.6013, -0.8999, 0.7077], [0.7088, -0.0334, -0.6577], [-0.2152, 1.3833, 0.3164], [1.1510, -0.1306, 0.6936]],
    ("vertical", (1, 1), 0.5, True): [[0.9897, -0.8487, 0.6496], [0.8999, -0.0005, -0.7219], [-0.0242, 1.5260, -0.5554], [-0.0260, 1.1539, 0.6168]],
    ("vertical", (1, 0.5), 0.5, True): [[0.7811, -0.9984, 0.5007], [0.5678, 0.1962, -0.7234], [-0.1839, 1.2600, -0.0643], [0.2938, 0.7970, 0.5274]],
    ("horizontal", (1, 1), 0.8, True): [[-0.0363, 0.3637, 1.2376], [0.7939, -0.7734, -0.5747], [0.5318, 0.8724, 0.0365], [0.3632, 0.4493, 0.9510]],
    ("vertical", (1, 1), 0.8, True): [[1.1728, -0.5438, 0.0868], [0.2358, 0.3928, -0.7249], [0.3195, 0.5321, -0.9821], [-0.0260, 1.1539, 0.6168]],
    ("horizontal", (1, 1), 0.5, False): [[0.4344, -0.3023, 0.5906], [0.4993, -0.1485, -0.3179], [0.0120, 0.9605, -0.0070], [0.4845, 0.0084, 0.4947]],
}


@pytest.mark.parametrize("case", list(WORKED))
@pytest.mark.parametrize("compat", [False, True])
def test_worked_example(case, compat):
    direction, c, rho, disjoint = case
    out = _merge([D1, D2], list(c), direction=direction, singular_matrices_drop_rate=rho,
                 enable_disjoint_mean=disjoint, reference_compat=compat)
    assert np.abs(out - np.array(WORKED[case])).max() < 6e-5


def _group(deltas, **params):
    spec = get_method("drm")
    p, models = build_params(spec, {"svd_dtype": "float64", **params}, {}, [{}] * len(deltas), ["a", "b", "c", "d"][: len(deltas)])
    d = torch.stack([torch.as_tensor(x, dtype=F64) for x in deltas])
    return spec, p, TensorGroup(name="w", base=torch.zeros_like(d[0]), deltas=d, model_params=models, kind="matrix")


def test_worked_intermediates():
    spec, p, group = _group([D1, D2], direction="horizontal", singular_matrices_drop_rate=0.5)
    stacked = np.concatenate([np.array(D1), np.array(D2)], axis=1)
    s = np.linalg.svd(stacked, compute_uv=False)
    assert np.allclose(s, [2.3325, 1.8348, 1.1070, 0.7332], atol=5e-5)
    factors = spec.decompose(group, p)
    nu = factors["sigma"].numpy() / s[None, :]
    assert np.allclose(nu, [[0.7774, 0.5849, 0.9826, 0.2633], [0.6290, 0.8111, 0.1858, 0.9647]], atol=5e-5)
    assert np.allclose(factors["sigma"].numpy(), [[1.8132, 1.0732, 1.0877, 0.1930], [1.4671, 1.4882, 0.2057, 0.7073]], atol=5e-5)
    tau = drm.keep_threshold(factors["blocks"], 0.5)
    assert int((factors["blocks"].abs() >= tau).sum()) == 13  # of 24: round(N k) + 1
    spec, p, group = _group([D1, D2], direction="vertical", singular_matrices_drop_rate=0.5)
    factors = spec.decompose(group, p)
    s = np.linalg.svd(np.concatenate([np.array(D1), np.array(D2)], axis=0), compute_uv=False)
    assert np.allclose(s, [2.4219, 1.7752, 1.2463], atol=5e-5)
    assert np.allclose(factors["sigma"].numpy() / s[None, :], [[0.7566, 0.6265, 0.8283], [0.6539, 0.7794, 0.5603]], atol=5e-5)


def _reference(deltas, c, rho, direction, tol=1e-2, disjoint=True):
    """Independent float64 numpy DRM from drm.md §1 (guards for zero norms added)."""
    def prune(x):
        keep = 1 - rho
        if keep == 1:
            return x.copy()
        a = np.sort(np.abs(x).ravel())
        k = a.size - round(a.size * keep)
        if k <= 0:
            return x.copy()
        y = x.copy()
        y[np.abs(y) < a[k - 1]] = 0
        return y

    def elect(x):
        g = np.sign(x.sum(0, keepdims=True))
        g = np.where(g == 0, np.sign(g.sum()), g)
        return np.where(np.sign(x) != g, 0.0, x)

    def mean(x):
        return x.sum(0) / np.maximum((x != 0).sum(0), 1) if disjoint else x.mean(0)

    T = len(deltas)
    c = np.asarray(c, float).reshape(T, 1, 1)
    if direction == "horizontal":
        U, s, Vh = np.linalg.svd(np.concatenate(deltas, 1), full_matrices=False)
        r = int((s > tol * s.max()).sum())
        U, s, Vh = U[:, :r], s[:r], Vh[:r]
        B = np.stack(np.split(Vh, T, 1))
        nu = np.linalg.norm(B, axis=2, keepdims=True)
        ok = nu > 1e-12
        X = s[None, :, None] * np.where(ok, nu, 0) * prune(np.where(ok, B / np.where(ok, nu, 1), 0))
        return U @ mean(elect(X) * c)
    U, s, Vh = np.linalg.svd(np.concatenate(deltas, 0), full_matrices=False)
    r = int((s > tol * s.max()).sum())
    U, s, Vh = U[:, :r], s[:r], Vh[:r]
    A = np.stack(np.split(U, T, 0))
    mu = np.linalg.norm(A, axis=1, keepdims=True)
    ok = mu > 1e-12
    X = prune(np.where(ok, A / np.where(ok, mu, 1), 0)) * (s[None, None, :] * np.where(ok, mu, 0))
    return mean(elect(X) * c) @ Vh


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(7, 4), (4, 9), (6, 6)])
@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_matches_independent_implementation(T, shape, direction):
    rng = np.random.default_rng(T * 100 + shape[0])
    deltas = [rng.normal(size=shape) for _ in range(T)]
    c = rng.uniform(0.3, 1.5, size=T).tolist()
    rho = float(rng.choice([0.2, 0.5, 0.9]))
    out = _merge(deltas, c, direction=direction, singular_matrices_drop_rate=rho)
    assert np.allclose(out, _reference(deltas, c, rho, direction), atol=1e-10)


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_one_task_nothing_pruned_returns_rank_truncated_delta(direction):
    rng = np.random.default_rng(0)
    d = rng.normal(size=(6, 5))
    U, s, Vh = np.linalg.svd(d, full_matrices=False)
    s[-1] = 1e-4 * s[0]  # below the 1 % relative cut
    d = (U * s) @ Vh
    out = _merge([d], [1.0], direction=direction, singular_matrices_drop_rate=0.0)
    truncated = (U[:, :-1] * s[:-1]) @ Vh[:-1]
    assert np.allclose(out, truncated, atol=1e-10)


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_invariant_to_svd_sign_flips(direction):
    rng = np.random.default_rng(1)
    spec, p, group = _group([rng.normal(size=(5, 4)) for _ in range(3)], direction=direction, singular_matrices_drop_rate=0.6)
    factors = spec.decompose(group, p)
    flips = torch.tensor([(-1.0) ** j for j in range(factors["sigma"].shape[1])], dtype=F64)
    flipped = dict(factors)
    if direction == "horizontal":
        flipped["basis"] = factors["basis"] * flips  # columns of U
        flipped["blocks"] = factors["blocks"] * flips.reshape(1, -1, 1)  # rows of each V block
    else:
        flipped["basis"] = factors["basis"] * flips.reshape(-1, 1)  # rows of Vh
        flipped["blocks"] = factors["blocks"] * flips.reshape(1, 1, -1)  # columns of each U block
    rng_ = generator_for(0, "w")
    one = spec.combine(group, spec.sparsify(group, factors, p, rng_), p)
    two = spec.combine(group, spec.sparsify(group, flipped, p, rng_), p)
    assert torch.allclose(one, two, atol=1e-12)


def test_zero_task_delta_gives_no_nan_and_all_zero_gives_zero():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 3))
    for direction in ("horizontal", "vertical"):
        out = _merge([a, np.zeros((4, 3))], direction=direction, singular_matrices_drop_rate=0.5)
        assert np.isfinite(out).all()
        assert np.allclose(out, _reference([a, np.zeros((4, 3))], [1, 1], 0.5, direction), atol=1e-10)
        assert np.array_equal(_merge([np.zeros((4, 3))] * 2, direction=direction), np.zeros((4, 3)))
    compat = _merge([a, np.zeros((4, 3))], singular_matrices_drop_rate=0.5, reference_compat=True)
    assert np.isnan(compat).any()  # what the reference does (drm.md §3)


def test_tiny_drop_rate_keeps_everything():
    rng = np.random.default_rng(3)
    deltas = [rng.normal(size=(4, 3)) for _ in range(2)]
    assert np.allclose(_merge(deltas, singular_matrices_drop_rate=0.01), _merge(deltas, singular_matrices_drop_rate=0.0))


def test_reference_rho_zero_bypass_is_a_plain_disjoint_mean():
    out = _merge([D1, D2], [1.0, 0.2], singular_matrices_drop_rate=0.0, reference_compat=True)
    d = np.stack([np.array(D1), np.array(D2)])
    assert np.allclose(out, d.sum(0) / np.maximum((d != 0).sum(0), 1))  # no election, no coefficients


def test_non_matrix_path_by_hand():
    """1-D tensor: global trim thresholds, majority sign election, coefficients, disjoint mean."""
    spec = get_method("drm")
    p, models = build_params(spec, {"non_linear_module_entries_drop_rate": 0.5}, {}, [{"coefficient": 1.0}, {"coefficient": 0.5}], ["a", "b"])
    deltas = torch.tensor([[0.4, -0.1, 0.3, 2.0], [-0.2, 0.5, 0.6, 1.0]], dtype=F64)
    group = TensorGroup(name="b", base=torch.zeros(4, dtype=F64), deltas=deltas, model_params=models, kind="other",
                        trim_thresholds=torch.tensor([0.3, 0.5], dtype=F64))
    factors = spec.sparsify(group, spec.decompose(group, p), p, generator_for(0, "b"))
    out = spec.combine(group, factors, p)
    # trim: a -> (0.4, 0, 0.3, 2.0); b -> (0, 0.5, 0.6, 1.0); signs all +; c = (1, 0.5)
    # disjoint mean: (0.4, 0.25, (0.3 + 0.3)/2, (2.0 + 0.5)/2)
    assert torch.allclose(out, torch.tensor([0.4, 0.25, 0.3, 1.25], dtype=F64))


def test_new_drop_rate_or_coefficients_reuse_one_decomposition(monkeypatch):
    calls = []
    original = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or original(*a, **k))
    spec, p, group = _group([D1, D2], singular_matrices_drop_rate=0.5)
    factors = spec.decompose(group, p)
    assert len(calls) == 1
    for rho in (0.3, 0.5, 0.9):
        for c in ((1.0, 1.0), (1.0, 0.2)):
            p2, models = build_params(spec, {"svd_dtype": "float64", "singular_matrices_drop_rate": rho}, {},
                                      [{"coefficient": c[0]}, {"coefficient": c[1]}], ["a", "b"])
            g2 = TensorGroup(**{**group.__dict__, "model_params": models})
            out = spec.combine(g2, spec.sparsify(g2, factors, p2, generator_for(0, "w")), p2)
            assert np.allclose(out.numpy(), _reference([np.array(D1), np.array(D2)], c, rho, "horizontal"), atol=1e-10)
    assert len(calls) == 1


def test_reference_bypass_is_decided_after_the_cached_decomposition():
    """reference_compat with rho = 0 (§1.6) must not need a different decomposition: factors
    cached at rho = 0.5 give the same result as a fresh run at rho = 0."""
    spec, p_half, group = _group([D1, D2], singular_matrices_drop_rate=0.5, reference_compat=True)
    _, p_zero, _ = _group([D1, D2], singular_matrices_drop_rate=0.0, reference_compat=True)
    cached = spec.decompose(group, p_half)
    staged = spec.combine(group, spec.sparsify(group, cached, p_zero, generator_for(0, "w")), p_zero)
    d = np.stack([np.array(D1), np.array(D2)])
    assert np.allclose(staged.numpy(), d.sum(0) / np.maximum((d != 0).sum(0), 1))


def test_float32_guard_drops_noise_rows_of_tasks_with_disjoint_supports():
    """Tasks with disjoint row supports (DRM-H): each shared direction u_j belongs to one task;
    the other tasks' block rows are SVD round-off (up to ~1e-5 in float32). Unguarded, they
    become unit rows that take pruning budget and join the disjoint mean (here: 2 % off the
    float64 result with a 32-eps cut; the sqrt(eps) guard stays at float32 round-off)."""
    rng = np.random.default_rng(52)
    deltas = [np.zeros((30, 20)) for _ in range(3)]
    for t, rows in enumerate(np.array_split(rng.permutation(30), 3)):
        deltas[t][rows] = rng.normal(size=(len(rows), 20)) * 10.0 ** (t - 1)
    f64 = _merge(deltas, singular_matrices_drop_rate=0.5)
    f32 = _merge(deltas, singular_matrices_drop_rate=0.5, svd_dtype="float32")
    assert np.abs(f32 - f64).max() < 1e-5 * np.abs(f64).max()
