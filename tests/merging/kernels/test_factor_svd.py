"""Factor-route SVDs (lora-core.md §2) against dense references formed in the test, the DRM
worked example of drm.md §4 (a dense D is the LoRA pair B = D, A = I), and the DRM claim:
factor and dense DRM give the same merged delta for rank >= 2 adapters."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging.kernels.factor_svd import drm_factors, hstack_svd, sum_svd, task_norms, vstack_svd
from merging.methods import drm
from merging.rng import generator_for
from merging.spec import TensorGroup

F64 = torch.float64


def adapters(seed: int, n: int, m: int, ranks: list[int]):
    """Random B_t (n, r_t), A_t (r_t, m), scalings s_t in [0.25, 2] and the dense D_t = s_t B_t A_t."""
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(n, r, generator=g, dtype=F64) for r in ranks]
    as_ = [torch.randn(r, m, generator=g, dtype=F64) for r in ranks]
    scales = (0.25 + 1.75 * torch.rand(len(ranks), generator=g, dtype=F64)).tolist()
    dense = [s * b @ a for s, b, a in zip(scales, bs, as_)]
    return bs, as_, scales, dense


def assert_orthonormal_columns(x: torch.Tensor) -> None:
    torch.testing.assert_close(x.T @ x, torch.eye(x.shape[1], dtype=x.dtype), atol=1e-12, rtol=0)


def assert_same_pairs(u, vh, u_dense, vh_dense, atol=1e-9):
    """Each pair (u_j, v_j) equals the dense one up to a joint sign (distinct singular values)."""
    k = u.shape[1]
    signs = torch.sign((u * u_dense[:, :k]).sum(dim=0))
    assert (signs != 0).all()
    torch.testing.assert_close(u * signs, u_dense[:, :k], atol=atol, rtol=0)
    torch.testing.assert_close(vh * signs.unsqueeze(1), vh_dense[:k], atol=atol, rtol=0)


SHAPES = [  # (n, m, ranks): equal ranks, different ranks, R > n, R > m, R > both
    (9, 7, [2, 2]),
    (10, 8, [1, 3, 2]),
    (4, 12, [2, 3]),
    (12, 3, [2, 2, 2]),
    (5, 4, [3, 4, 2]),
]


@pytest.mark.parametrize(("n", "m", "ranks"), SHAPES)
def test_sum_svd_equals_the_dense_svd(n, m, ranks):
    bs, as_, scales, dense = adapters(0, n, m, ranks)
    total = sum(dense)
    u, s, vh = sum_svd(bs, as_, scales)
    u_d, s_d, vh_d = torch.linalg.svd(total, full_matrices=False)
    k = min(n, m, sum(ranks))
    assert s.shape == (k,) and u.shape == (n, k) and vh.shape == (k, m)
    torch.testing.assert_close(s, s_d[:k], atol=1e-12 * s_d[0], rtol=0)
    torch.testing.assert_close((u * s) @ vh, total, atol=1e-12 * s_d[0], rtol=0)
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(vh.T)
    assert_same_pairs(u, vh, u_d, vh_d)


@pytest.mark.parametrize(("n", "m", "ranks"), SHAPES)
def test_hstack_svd_equals_the_dense_svd_of_the_side_by_side_stack(n, m, ranks):
    bs, as_, scales, dense = adapters(1, n, m, ranks)
    stack = torch.cat(dense, dim=1)  # (n, T m)
    u, s, blocks = hstack_svd(bs, as_, scales)
    u_d, s_d, vh_d = torch.linalg.svd(stack, full_matrices=False)
    k = min(n, sum(ranks))  # rank of [D_1 | ... | D_T] for generic factors
    assert s.shape == (k,) and u.shape == (n, k) and blocks.shape == (len(ranks), k, m)
    torch.testing.assert_close(s, s_d[:k], atol=1e-12 * s_d[0], rtol=0)
    vh = torch.cat(list(blocks), dim=1)  # (k, T m)
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(vh.T)
    assert_same_pairs(u, vh, u_d, vh_d)
    for t, d in enumerate(dense):
        torch.testing.assert_close((u * s) @ blocks[t], d, atol=1e-12 * s_d[0], rtol=0)


@pytest.mark.parametrize(("n", "m", "ranks"), SHAPES)
def test_vstack_svd_equals_the_dense_svd_of_the_stack_on_top(n, m, ranks):
    bs, as_, scales, dense = adapters(2, n, m, ranks)
    stack = torch.cat(dense, dim=0)  # (T n, m)
    blocks, s, vh = vstack_svd(bs, as_, scales)
    u_d, s_d, vh_d = torch.linalg.svd(stack, full_matrices=False)
    k = min(m, sum(ranks))
    assert s.shape == (k,) and vh.shape == (k, m) and blocks.shape == (len(ranks), n, k)
    torch.testing.assert_close(s, s_d[:k], atol=1e-12 * s_d[0], rtol=0)
    u = torch.cat(list(blocks), dim=0)  # (T n, k)
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(vh.T)
    assert_same_pairs(u, vh, u_d, vh_d)
    for t, d in enumerate(dense):
        torch.testing.assert_close((blocks[t] * s) @ vh, d, atol=1e-12 * s_d[0], rtol=0)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_property_every_route_reproduces_its_matrix_and_dense_spectrum(n, m, ranks, seed):
    bs, as_, scales, dense = adapters(seed, n, m, ranks)
    for route, formed in ((sum_svd, sum(dense)), (hstack_svd, torch.cat(dense, 1)), (vstack_svd, torch.cat(dense, 0))):
        result = route(bs, as_, scales)
        s_d = torch.linalg.svdvals(formed)
        k = result.s.numel()
        assert k <= min(formed.shape) and k <= sum(ranks)
        scale = s_d[0]
        torch.testing.assert_close(result.s, s_d[:k], atol=1e-11 * scale, rtol=0)
        assert (s_d[k:] <= 1e-11 * scale).all()  # nothing non-zero was dropped
        if route is sum_svd:
            rebuilt = (result.u * result.s) @ result.vh
        elif route is hstack_svd:
            rebuilt = (result.u * result.s) @ torch.cat(list(result.vh_blocks), 1)
        else:
            rebuilt = (torch.cat(list(result.u_blocks), 0) * result.s) @ result.vh
        torch.testing.assert_close(rebuilt, formed, atol=1e-11 * scale, rtol=0)


def test_rank_deficient_inputs_return_only_the_non_zero_triplets():
    """Tasks sharing their B directions: [D_1 | D_2] and D_1 + D_2 have rank 2 < R = 4."""
    g = torch.Generator().manual_seed(3)
    b = torch.randn(8, 2, generator=g, dtype=F64)
    mix = torch.tensor([[2.0, -1.0], [0.5, 1.5]], dtype=F64)
    bs = [b, b @ mix]
    as_ = [torch.randn(2, 6, generator=g, dtype=F64) for _ in range(2)]
    dense = [x @ y for x, y in zip(bs, as_)]
    u, s, vh = sum_svd(bs, as_, [1.0, 1.0])
    s_d = torch.linalg.svdvals(sum(dense))
    assert s.numel() == 2 and s_d[2] < 1e-13 * s_d[0]  # the dense route has 4 more, at rounding level
    torch.testing.assert_close(s, s_d[:2], atol=1e-12, rtol=0)
    torch.testing.assert_close((u * s) @ vh, sum(dense), atol=1e-12, rtol=0)
    u, s, blocks = hstack_svd(bs, as_, [1.0, 1.0])
    assert s.numel() == 2 and blocks.shape == (2, 2, 6)
    torch.testing.assert_close(u @ u.T @ b, b, atol=1e-12, rtol=0)  # U spans span(B)


@pytest.mark.parametrize("route", [sum_svd, hstack_svd, vstack_svd])
def test_small_but_real_singular_values_are_kept(route):
    """A task scaled by 1e-10 is far above the null cut (~ max(n, m, R) eps relative): all R kept."""
    bs, as_, _, _ = adapters(9, 10, 9, [2, 3])
    scales = [1.0, 1e-10]
    result = route(bs, as_, scales)
    dense = [s * b @ a for s, b, a in zip(scales, bs, as_)]
    formed = {sum_svd: sum(dense), hstack_svd: torch.cat(dense, 1), vstack_svd: torch.cat(dense, 0)}[route]
    s_d = torch.linalg.svdvals(formed)
    assert result.s.numel() == 5 and result.s[-1] < 1e-8 * result.s[0]
    torch.testing.assert_close(result.s, s_d[:5], atol=1e-13 * s_d[0], rtol=0)


def test_cancelling_sum_and_all_zero_inputs_have_no_triplets():
    bs, as_, _, _ = adapters(4, 6, 5, [2, 2])
    u, s, vh = sum_svd([bs[0], -bs[0]], [as_[0], as_[0]], [1.0, 1.0])  # D_1 + D_2 = 0 exactly
    assert u.shape == (6, 0) and s.shape == (0,) and vh.shape == (0, 5)
    zeros_b, zeros_a = [torch.zeros(6, 2, dtype=F64)] * 2, [torch.zeros(2, 5, dtype=F64)] * 2
    assert sum_svd(zeros_b, zeros_a, [1.0, 1.0]).s.numel() == 0
    assert hstack_svd(zeros_b, zeros_a, [1.0, 1.0]).vh_blocks.shape == (2, 0, 5)
    assert vstack_svd(zeros_b, zeros_a, [1.0, 1.0]).u_blocks.shape == (2, 6, 0)
    # one zero adapter among others: only its triplets vanish
    u, s, blocks = hstack_svd([bs[0], zeros_b[0]], [as_[0], zeros_a[0]], [1.0, 1.0])
    assert s.numel() == 2 and blocks[1].abs().max() < 1e-13


def test_gauge_and_scaling_changes_leave_the_decompositions_unchanged():
    """(B G, G^-1 A) and s_t moved into B_t give the same matrices, hence the same s and subspaces."""
    bs, as_, scales, _ = adapters(5, 7, 6, [2, 3])
    g = torch.Generator().manual_seed(6)
    gauges = [
        torch.randn(a.shape[0], a.shape[0], generator=g, dtype=F64) + 3 * torch.eye(a.shape[0], dtype=F64) for a in as_
    ]
    bs2 = [s * b @ gauge for s, b, gauge in zip(scales, bs, gauges)]
    as2 = [torch.linalg.solve(gauge, a) for gauge, a in zip(gauges, as_)]
    for route in (sum_svd, hstack_svd, vstack_svd):
        one, two = route(bs, as_, scales), route(bs2, as2, [1.0, 1.0])
        torch.testing.assert_close(one.s, two.s, atol=1e-11, rtol=0)
    one, two = hstack_svd(bs, as_, scales), hstack_svd(bs2, as2, [1.0, 1.0])
    torch.testing.assert_close(one.u @ one.u.T, two.u @ two.u.T, atol=1e-10, rtol=0)
    signs = torch.sign((one.u * two.u).sum(0))  # distinct values: pairs agree up to a joint sign
    torch.testing.assert_close(one.vh_blocks * signs.reshape(1, -1, 1), two.vh_blocks, atol=1e-10, rtol=0)


def test_spec_worked_example_sum_spectrum():
    """lora-core.md §5: sv of B_1 A_1 + B_2 A_2 = [5.66753, 3.4692] (the dense route adds a zero)."""
    bs = [torch.tensor([[1, 0.5, -1, 2]], dtype=F64).T, torch.tensor([[0.5, -1.5, 1, 0.25]], dtype=F64).T]
    as_ = [torch.tensor([[2, -1, 0.5]], dtype=F64), torch.tensor([[1, 0.5, -1.5]], dtype=F64)]
    u, s, vh = sum_svd(bs, as_, [1.0, 1.0])
    torch.testing.assert_close(s, torch.tensor([5.66753, 3.4692], dtype=F64), atol=1e-5, rtol=0)
    expected = torch.tensor([[2.5, -0.75, -0.25], [-0.5, -1.25, 2.5], [-1, 1.5, -2], [4.25, -1.875, 0.625]], dtype=F64)
    torch.testing.assert_close((u * s) @ vh, expected, atol=1e-14, rtol=0)


def test_task_norms_are_the_frobenius_norms():
    bs, as_, scales, dense = adapters(7, 6, 9, [1, 4, 2])
    torch.testing.assert_close(task_norms(bs, as_, scales), torch.stack([d.norm() for d in dense]), atol=1e-12, rtol=0)


def test_mismatched_factors_are_refused_naming_the_task():
    bs, as_, scales, _ = adapters(8, 6, 5, [2, 2])
    with pytest.raises(ValueError, match="task 1"):
        sum_svd([bs[0], bs[1][:, :1]], as_, scales)
    with pytest.raises(ValueError, match="task 1"):
        hstack_svd(bs, [as_[0], torch.zeros(2, 4, dtype=F64)], scales)
    with pytest.raises(ValueError, match="one scaling per task"):
        vstack_svd(bs, as_, [1.0])


# --- DRM ------------------------------------------------------------------------------------

D1 = [[0.5, -1.2, 0.3], [0.8, 0.1, -0.7], [-0.4, 0.9, 0.6], [1.1, -0.2, 0.4]]
D2 = [[-0.3, 0.7, 0.9], [0.6, -0.5, 0.2], [0.1, 1.0, -0.8], [-0.9, 0.4, 0.5]]


def drm_merge(factors, dense, direction, rho, coefficients):
    """The rest of DRM's pipeline (merging/methods/drm.py sparsify + combine) on given factors."""
    params = drm.DrmParams(direction=direction, singular_matrices_drop_rate=rho, svd_dtype="float64")
    models = tuple(drm.DrmModelParams(coefficient=c) for c in coefficients)
    group = TensorGroup(name="w", base=torch.zeros_like(dense[0]), deltas=torch.stack(dense), model_params=models)
    if factors is None:
        factors = drm.decompose(group, params)
    return drm.combine(group, drm.sparsify(group, factors, params, generator_for(0, "w")), params), factors


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_drm_worked_example_as_lora_pairs(direction):
    """drm.md §4 (numbers as in test_drm.py): D_t = D_t @ I_3 is a rank-3 LoRA pair."""
    dense = [torch.tensor(D1, dtype=F64), torch.tensor(D2, dtype=F64)]
    factors = drm_factors(dense, [torch.eye(3, dtype=F64)] * 2, [1.0, 1.0], direction=direction, rel_rank_tol=1e-2)
    singular = factors["sigma"].norm(dim=0)  # sum_t (s nu_t)^2 = s^2: the block norms split s
    expected_s = [2.3325, 1.8348, 1.1070, 0.7332] if direction == "horizontal" else [2.4219, 1.7752, 1.2463]
    torch.testing.assert_close(singular, torch.tensor(expected_s, dtype=F64), atol=5e-5, rtol=0)
    expected = {
        "horizontal": [
            [0.6778, -0.6046, 1.1811],
            [0.7917, -0.2971, -0.6359],
            [-0.1467, 1.9211, -0.0141],
            [1.0989, 0.0168, 0.9895],
        ],
        "vertical": [
            [0.9897, -0.8487, 0.6496],
            [0.8999, -0.0005, -0.7219],
            [-0.0242, 1.5260, -0.5554],
            [-0.0260, 1.1539, 0.6168],
        ],
    }[direction]
    merged, _ = drm_merge(factors, dense, direction, 0.5, [1.0, 1.0])
    torch.testing.assert_close(merged, torch.tensor(expected, dtype=F64), atol=6e-5, rtol=0)


CLAIM_CASES = [  # (seed, n, m, ranks, rho)
    (10, 9, 7, [2, 2], 0.5),
    (11, 12, 10, [2, 3, 4], 0.8),
    (12, 6, 13, [3, 2, 2, 4], 0.2),
    (13, 5, 4, [2, 3], 0.6),  # R > n, R > m
    (14, 11, 6, [4, 4, 2], 0.9),
    (15, 8, 8, [2, 2, 2, 2], 0.0),
]


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
@pytest.mark.parametrize(("seed", "n", "m", "ranks", "rho"), CLAIM_CASES)
def test_drm_claim_factor_and_dense_drm_merge_to_the_same_delta(direction, seed, n, m, ranks, rho):
    """lora-core.md §2 "DRM claim": rank >= 2 adapters, distinct singular values -> equal within 1e-10."""
    bs, as_, scales, dense = adapters(seed, n, m, ranks)
    coefficients = torch.linspace(0.5, 1.5, len(ranks)).tolist()
    factors = drm_factors(bs, as_, scales, direction=direction, rel_rank_tol=1e-2)
    merged_dense, dense_factors = drm_merge(None, dense, direction, rho, coefficients)
    assert factors.keys() == dense_factors.keys()
    for key in factors:
        assert factors[key].shape == dense_factors[key].shape and factors[key].dtype == F64
    torch.testing.assert_close(factors["sigma"], dense_factors["sigma"], atol=1e-12, rtol=0)  # sign-free
    merged, _ = drm_merge(factors, dense, direction, rho, coefficients)
    scale = merged_dense.abs().max()
    torch.testing.assert_close(merged, merged_dense, atol=1e-10 * scale, rtol=0)


def test_drm_factors_of_zero_adapters_merge_to_zero_and_rank_one_warns(caplog):
    zeros_b, zeros_a = [torch.zeros(5, 2, dtype=F64)] * 2, [torch.zeros(2, 4, dtype=F64)] * 2
    factors = drm_factors(zeros_b, zeros_a, [1.0, 1.0], direction="horizontal", rel_rank_tol=1e-2)
    assert factors["blocks"].shape == (2, 0, 4) and factors["basis"].shape == (5, 0)
    merged, _ = drm_merge(factors, [torch.zeros(5, 4, dtype=F64)] * 2, "horizontal", 0.5, [1.0, 1.0])
    assert torch.equal(merged, torch.zeros(5, 4, dtype=F64))
    assert "rank-1" not in caplog.text
    bs, as_, scales, _ = adapters(16, 5, 4, [1, 2])
    with caplog.at_level(logging.WARNING, logger="merging.kernels.factor_svd"):
        drm_factors(bs, as_, scales, direction="vertical", rel_rank_tol=1e-2)
    assert "rank-1" in caplog.text


def test_drm_factors_compute_in_the_requested_dtype():
    bs, as_, scales, _ = adapters(17, 6, 5, [2, 2])
    factors = drm_factors(bs, as_, scales, direction="horizontal", rel_rank_tol=1e-2, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in factors.values())
