"""Core Space merging (lora-core.md §3): the worked example of §5, core TA == full-space TA,
TSV-M / Iso-C against full-space computations restricted to the adapters' span, TIES with
mergeflow's keep count, DARE's draws, gauge and sign-flip invariance, R > n, mapping back."""

from __future__ import annotations

import pytest
import torch

from merging.kernels.core_space import (
    dare_cores,
    densify,
    drop_and_rescale,
    factors_from_core,
    isotropize_core,
    project_to_core,
    reference_bases,
    task_arithmetic_cores,
    ties_cores,
    trim_cores,
    tsv_cores,
)
from merging.rng import generator_for, uniform

F64 = torch.float64

# lora-core.md §5: n = 4, m = 3, r = 1, T = 2, s_t = 1
B1, A1 = [1, 0.5, -1, 2], [2, -1, 0.5]
B2, A2 = [0.5, -1.5, 1, 0.25], [1, 0.5, -1.5]
U_REF = [[0.331616, -0.40091], [0.339376, 0.722477], [-0.480389, -0.390174], [0.737618, -0.406279]]
V_REF = [[0.945414, -0.135918], [-0.325136, -0.454497], [-0.0218953, 0.880318]]
M1 = [[5.41757, 1.53022], [-1.01884, -0.287777]]
M2 = [[-0.521421, 1.07625], [-1.44859, 2.99]]
M_TA = [[4.89615, 2.60648], [-2.46743, 2.70223]]
DELTA_TA = [[2.5, -0.75, -0.25], [-0.5, -1.25, 2.5], [-1, 1.5, -2], [4.25, -1.875, 0.625]]
M_ISO = [[3.79919, 2.53695], [-2.53695, 3.79919]]
DELTA_ISO = [
    [2.24535, -0.430429, -0.65009],
    [-1.00396, -1.4621, 3.18616],
    [-0.422518, 1.49919, -2.35951],
    [3.57928, -1.39524, 0.204621],
]
M_TIES_3_OF_4 = [[5.41757, 1.30324], [-1.23372, 2.99]]
DELTA_TIES_3_OF_4 = [
    [2.27028, -0.396546, -0.724972],
    [0.541831, -1.49082, 2.27028],
    [-1.76173, 1.50444, -1.53169],
    [4.28629, -1.34704, -0.321615],
]
PRINTED = 1e-5  # the spec prints 6 significant digits


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def worked_space():
    return project_to_core([t64([B1]).T, t64([B2]).T], [t64([A1]), t64([A2])], [1.0, 1.0])


def adapters(seed: int, n: int, m: int, ranks: list[int]):
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(n, r, generator=g, dtype=F64) for r in ranks]
    as_ = [torch.randn(r, m, generator=g, dtype=F64) for r in ranks]
    scales = (0.25 + 1.75 * torch.rand(len(ranks), generator=g, dtype=F64)).tolist()
    return bs, as_, scales, [s * b @ a for s, b, a in zip(scales, bs, as_)]


def close(actual, expected, atol):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=F64), atol=atol, rtol=0)


def polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


# --- the worked example -------------------------------------------------------------------------


def test_worked_example_bases_cores_and_task_arithmetic():
    space = worked_space()
    close(space.u_ref, U_REF, PRINTED)  # our sign convention: each column's largest |.| positive
    close(space.v_ref, V_REF, PRINTED)
    close(space.cores[0], M1, PRINTED)
    close(space.cores[1], M2, PRINTED)
    merged = task_arithmetic_cores(space.cores, [1.0, 1.0], normalize=False)
    close(merged, M_TA, PRINTED)
    close(densify(*factors_from_core(space, merged)), DELTA_TA, 1e-14)  # = B_1 A_1 + B_2 A_2 exactly


def test_worked_example_iso_c_in_core():
    space = worked_space()
    merged = isotropize_core(task_arithmetic_cores(space.cores, [1.0, 1.0], normalize=False))
    close(merged, M_ISO, PRINTED)
    delta = densify(*factors_from_core(space, merged))
    close(delta, DELTA_ISO, PRINTED)
    close(torch.linalg.svdvals(delta), [4.56837, 4.56837, 0.0], PRINTED)
    # second route of §5: dense SVD of Delta_TA, mean of the top R = 2 values times U_2 V_2^T
    u, s, vh = torch.linalg.svd(t64(DELTA_TA), full_matrices=False)
    close(delta, s[:2].mean() * u[:, :2] @ vh[:2], 1e-13)


@pytest.mark.parametrize(("weight_before_election", "tie_rule"), [(False, "majority"), (True, "positive")])
def test_worked_example_ties_with_mergeflows_keep_count(weight_before_election, tie_rule):
    """The spec's TIES numbers use the reference's count, int(d K) + 1 = 3 of 4 entries at topK 50.
    mergeflow keeps exactly max(1, floor(density K)): density 0.75 keeps those same 3 entries and
    reproduces the spec; density 0.5 keeps 2 per core (M_1: 5.41757, 1.53022; M_2: 2.99,
    -1.44859), no position has two kept entries of opposite sign, so the merged core is
    [[M1_00, M1_01], [M2_10, M2_11]], mapped back through the spec's printed U_ref, V_ref."""
    space = worked_space()
    kwargs = {"normalize": True, "weight_before_election": weight_before_election, "tie_rule": tie_rule}
    merged = ties_cores(space.cores, [0.75, 0.75], [1.0, 1.0], **kwargs)
    close(merged, M_TIES_3_OF_4, PRINTED)
    close(densify(*factors_from_core(space, merged)), DELTA_TIES_3_OF_4, PRINTED)
    merged = ties_cores(space.cores, [0.5, 0.5], [1.0, 1.0], **kwargs)
    expected_core = t64([[M1[0][0], M1[0][1]], [M2[1][0], M2[1][1]]])
    close(merged, expected_core, PRINTED)
    close(densify(*factors_from_core(space, merged)), t64(U_REF) @ expected_core @ t64(V_REF).T, 3e-5)


def test_ties_in_core_is_invariant_to_basis_sign_flips():
    """Other sign conventions flip rows / columns of every core together (§5); so does the result."""
    cores = worked_space().cores
    rows, cols = t64([-1.0, 1.0]), t64([1.0, -1.0])
    flipped = rows.reshape(1, -1, 1) * cores * cols.reshape(1, 1, -1)
    kwargs = {"normalize": True, "weight_before_election": False, "tie_rule": "majority"}
    one = ties_cores(cores, [0.75, 0.5], [1.0, 0.7], **kwargs)
    two = ties_cores(flipped, [0.75, 0.5], [1.0, 0.7], **kwargs)
    close(rows.reshape(-1, 1) * two * cols, one, 1e-15)


# --- bases, cores, exactness ---------------------------------------------------------------------

SHAPES = [(9, 7, [2, 2, 2]), (10, 8, [1, 3, 2]), (3, 10, [2, 2, 2]), (12, 4, [3, 2]), (6, 6, [4])]


@pytest.mark.parametrize(("n", "m", "ranks"), SHAPES)
def test_bases_are_orthonormal_sign_canonical_and_cores_lossless(n, m, ranks):
    bs, as_, scales, dense = adapters(0, n, m, ranks)
    space = project_to_core(bs, as_, scales)
    big_r = sum(ranks)
    p, q = min(n, big_r), min(m, big_r)
    assert space.u_ref.shape == (n, p) and space.v_ref.shape == (m, q) and space.cores.shape == (len(ranks), p, q)
    for basis in (space.u_ref, space.v_ref):
        close(basis.T @ basis, torch.eye(basis.shape[1], dtype=F64), 1e-13)
        peaks = basis.gather(0, basis.abs().argmax(0, keepdim=True))
        assert (peaks > 0).all()
    b_cat, a_cat = torch.cat(bs, 1), torch.cat(as_, 0)
    close(space.u_ref @ space.u_ref.T @ b_cat, b_cat, 1e-12)  # span(U_ref) holds every B_t
    close(a_cat @ space.v_ref @ space.v_ref.T, a_cat, 1e-12)
    for t, d in enumerate(dense):
        close(space.u_ref @ space.cores[t] @ space.v_ref.T, d, 1e-12)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(("n", "m", "ranks"), SHAPES)
def test_core_task_arithmetic_equals_full_space_task_arithmetic(n, m, ranks, normalize):
    bs, as_, scales, dense = adapters(1, n, m, ranks)
    weights = torch.linspace(0.3, 1.7, len(ranks), dtype=F64)
    space = project_to_core(bs, as_, scales)
    merged = task_arithmetic_cores(space.cores, weights, normalize=normalize)
    full = sum(w * d for w, d in zip(weights, dense))
    if normalize:
        full = full / weights.sum()
    delta = densify(*factors_from_core(space, merged))
    torch.testing.assert_close(delta, full, atol=1e-12 * full.abs().max(), rtol=0)
    b_prime, a_prime = factors_from_core(space, merged)
    assert b_prime.shape[1] == a_prime.shape[0] <= sum(ranks)  # a LoRA of rank <= R


def test_scaling_lives_in_the_cores_not_the_bases():
    """alpha != r: the bases come from the raw factors, s_t scales M_t, TA stays exact."""
    bs, as_, _, _ = adapters(2, 7, 6, [2, 3])
    one = project_to_core(bs, as_, [1.0, 1.0])
    two = project_to_core(bs, as_, [0.5, 4.0])
    close(two.u_ref, one.u_ref, 0)
    close(two.cores, one.cores * t64([0.5, 4.0]).reshape(-1, 1, 1), 1e-13)


def test_gauge_changes_bases_but_not_ta_iso_or_tsv():
    """(B G, G^-1 A) keeps every D_t and the spans; TA, Iso-C and TSV-M are orthogonally covariant
    (§6), so their deltas do not change although the cores do. TIES, acting per entry, may."""
    bs, as_, scales, _ = adapters(3, 9, 8, [2, 2, 2])
    g = torch.Generator().manual_seed(4)
    gauges = [torch.randn(2, 2, generator=g, dtype=F64) + 2 * torch.eye(2, dtype=F64) for _ in bs]
    bs2 = [b @ gauge for b, gauge in zip(bs, gauges)]
    as2 = [torch.linalg.solve(gauge, a) for gauge, a in zip(gauges, as_)]
    one, two = project_to_core(bs, as_, scales), project_to_core(bs2, as2, scales)
    assert (one.cores - two.cores).abs().max() > 1e-3
    for merge in (
        lambda c: task_arithmetic_cores(c, [1.0, 1.0, 1.0], normalize=False),
        lambda c: isotropize_core(c.sum(0)),
        tsv_cores,
    ):
        close(
            densify(*factors_from_core(two, merge(two.cores))),
            densify(*factors_from_core(one, merge(one.cores))),
            1e-10,
        )


# --- TSV-M and Iso-C against full-space computations -------------------------------------------


def dense_tsv(dense: list[torch.Tensor], per_task: list[int]) -> torch.Tensor:
    """Full-space TSV-M with k_t triplets of each task (svd-methods.md §4), from the formed D_t."""
    us, ss, vhs = [], [], []
    for d, k in zip(dense, per_task):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return (polar(torch.cat(us, 1)) * torch.cat(ss)) @ polar(torch.cat(vhs, 0))


def test_tsv_in_core_equals_full_space_tsv_with_k_equal_r():
    """Equal ranks, R <= n, m: core k = int(R / T) = r, lossless per task (§3 `tsv`)."""
    bs, as_, scales, dense = adapters(5, 10, 9, [2, 2, 2])
    space = project_to_core(bs, as_, scales)
    delta = densify(*factors_from_core(space, tsv_cores(space.cores)))
    close(delta, dense_tsv(dense, [2, 2, 2]), 1e-11)


def test_tsv_in_core_with_different_ranks_leaves_null_slots_empty():
    """Ranks (1, 3): k = int(4 / 2) = 2, but task 1 has one non-zero triplet; its null slot stays
    empty instead of carrying an arbitrary singular vector."""
    bs, as_, scales, dense = adapters(6, 8, 7, [1, 3])
    space = project_to_core(bs, as_, scales)
    delta = densify(*factors_from_core(space, tsv_cores(space.cores)))
    close(delta, dense_tsv(dense, [1, 2]), 1e-11)


def test_tsv_with_more_tasks_than_the_core_rank_is_the_mean():
    cores = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    close(tsv_cores(cores), cores.mean(0), 0)


def test_tsv_is_covariant_under_rotations_of_the_core():
    g = torch.Generator().manual_seed(8)
    cores = torch.randn(2, 4, 4, generator=g, dtype=F64)
    left, right = (torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))[0] for _ in range(2))
    close(tsv_cores(left.T @ cores @ right), left.T @ tsv_cores(cores) @ right, 1e-12)


@pytest.mark.parametrize(("n", "m", "ranks"), [(10, 9, [2, 2, 2]), (9, 11, [1, 3]), (3, 10, [2, 2, 2])])
def test_iso_c_in_core_flattens_the_top_r_spectrum_of_the_sum(n, m, ranks):
    """Second route of §5: mean of the top min(p, q) singular values of the dense sum, U V^T."""
    bs, as_, scales, dense = adapters(9, n, m, ranks)
    space = project_to_core(bs, as_, scales)
    delta = densify(*factors_from_core(space, isotropize_core(space.cores.sum(0))))
    k = min(space.cores.shape[1:])
    u, s, vh = torch.linalg.svd(sum(dense), full_matrices=False)
    close(delta, s[:k].mean() * u[:, :k] @ vh[:k], 1e-11)


def test_basis_rtol_keeps_iso_c_inside_the_adapters_span():
    """Tasks sharing their B: B_cat (n, 4) has rank 2. All columns kept (the reference): Iso-C lifts
    two arbitrary completion directions, rank 4. basis_rtol drops them: rank 2, both values equal."""
    g = torch.Generator().manual_seed(10)
    b = torch.randn(9, 2, generator=g, dtype=F64)
    bs = [b, b @ t64([[1.0, 2.0], [-0.5, 1.0]])]
    as_ = [torch.randn(2, 8, generator=g, dtype=F64) for _ in range(2)]
    total = sum(x @ y for x, y in zip(bs, as_))
    full = project_to_core(bs, as_, [1.0, 1.0])
    spanned = project_to_core(bs, as_, [1.0, 1.0], basis_rtol=1e-10)
    assert full.u_ref.shape == (9, 4) and spanned.u_ref.shape == (9, 2) and spanned.v_ref.shape == (8, 4)
    ta = densify(*factors_from_core(spanned, spanned.cores.sum(0)))
    close(ta, total, 1e-12)  # still lossless
    lifted = torch.linalg.svdvals(densify(*factors_from_core(full, isotropize_core(full.cores.sum(0)))))
    inside = torch.linalg.svdvals(densify(*factors_from_core(spanned, isotropize_core(spanned.cores.sum(0)))))
    assert (lifted[:4] > 0.1).all()
    s = torch.linalg.svdvals(total)
    close(inside[:2], s[:2].mean().expand(2), 1e-12)
    assert inside[2:].abs().max() < 1e-12


# --- DARE ----------------------------------------------------------------------------------------


def test_dare_draws_one_uniform_per_task_in_order_and_rescales_by_density():
    cores = worked_space().cores
    merged = dare_cores(
        cores, [0.7, 0.4], [1.0, 0.5], generator_for(3, "q_proj"), rescale="inverse", elect=False, normalize=False
    )
    g = generator_for(3, "q_proj")
    keep = [uniform(cores[t].shape, g, cores[t]) < d for t, d in enumerate([0.7, 0.4])]
    expected = 1.0 * cores[0] * keep[0] / 0.7 + 0.5 * cores[1] * keep[1] / 0.4
    close(merged, expected, 1e-15)


def test_dare_is_seeded_and_density_one_is_task_arithmetic():
    bs, as_, scales, _ = adapters(11, 8, 8, [2, 2, 2])
    cores = project_to_core(bs, as_, scales).cores
    kwargs = {"rescale": "inverse", "elect": True, "normalize": False}
    one = dare_cores(cores, [0.5] * 3, [1.0] * 3, generator_for(0, "w"), **kwargs)
    two = dare_cores(cores, [0.5] * 3, [1.0] * 3, generator_for(0, "w"), **kwargs)
    other = dare_cores(cores, [0.5] * 3, [1.0] * 3, generator_for(1, "w"), **kwargs)
    assert torch.equal(one, two) and not torch.equal(one, other)
    kept = drop_and_rescale(cores, [1.0] * 3, generator_for(0, "w"), "inverse")
    assert torch.equal(kept, cores)
    linear = dare_cores(
        cores, [1.0] * 3, [1.0] * 3, generator_for(0, "w"), rescale="inverse", elect=False, normalize=False
    )
    close(linear, task_arithmetic_cores(cores, [1.0] * 3, normalize=False), 1e-15)


def test_trim_cores_keeps_exactly_floor_density_entries():
    cores = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(12), dtype=F64)
    trimmed = trim_cores(cores, [0.3, 1.0])
    assert int((trimmed[0] != 0).sum()) == 6  # floor(0.3 * 20)
    assert torch.equal(trimmed[1], cores[1])
    kept = trimmed[0][trimmed[0] != 0].abs()
    assert kept.min() >= cores[0].abs().flatten().sort(descending=True).values[5]


# --- mapping back, R > n, errors ------------------------------------------------------------------


def test_balanced_factors_have_the_core_rank_and_the_same_product():
    bs, as_, scales, dense = adapters(13, 10, 9, [2, 2])
    space = project_to_core(bs, as_, scales)
    core = space.cores.sum(0)
    core_rank_two = core.clone()
    core_rank_two[2:] = 0  # a rank-2 merged core
    for merged, rank in ((core, 4), (core_rank_two, 2)):
        b, a = factors_from_core(space, merged, balanced=True)
        assert b.shape == (10, rank) and a.shape == (rank, 9)
        close(b @ a, densify(*factors_from_core(space, merged)), 1e-12)
        close(b.T @ b, a @ a.T, 1e-12)  # balanced: both Gram matrices are diag(S)


def test_more_total_rank_than_rows():
    """R = 6 > n = 3: U_ref is a full basis (3, 3), cores (3, 6); TA exact, Iso over 3 values."""
    bs, as_, scales, dense = adapters(14, 3, 10, [2, 2, 2])
    space = project_to_core(bs, as_, scales)
    assert space.cores.shape == (3, 3, 6)
    close(densify(*factors_from_core(space, space.cores.sum(0))), sum(dense), 1e-12)
    iso = densify(*factors_from_core(space, isotropize_core(space.cores.sum(0))))
    s = torch.linalg.svdvals(sum(dense))
    close(torch.linalg.svdvals(iso), s.mean().expand(3), 1e-12)


def test_reference_bases_of_the_worked_example_match_the_spec_singular_values():
    """sv(B_cat) = [2.53873, 1.83504], sv(A_cat) = [2.35105, 1.79515] (§5)."""
    u_ref, v_ref = reference_bases([t64([B1]).T, t64([B2]).T], [t64([A1]), t64([A2])])
    b_cat, a_cat = t64([B1, B2]).T, t64([A1, A2])
    close((u_ref.T @ b_cat).norm(dim=1).sort(descending=True).values, [2.53873, 1.83504], PRINTED)
    close((a_cat @ v_ref).norm(dim=0).sort(descending=True).values, [2.35105, 1.79515], PRINTED)


def test_mismatched_factors_are_refused_naming_the_task():
    bs, as_, scales, _ = adapters(15, 5, 4, [2, 2])
    with pytest.raises(ValueError, match="task 1"):
        project_to_core(bs, [as_[0], torch.zeros(3, 4, dtype=F64)], scales)
    with pytest.raises(ValueError, match="one scaling per task"):
        project_to_core(bs, as_, [1.0])
