"""KnOTS (lora-core.md §4): the factor-route decomposition against the dense SVD of the formed
stack, the whole-model TIES merge against an independent implementation written from the spec
(dense SVDs, one flattened vector per task), one budget per task across layers, the global
majority fill, DARE composed per matrix, sign-flip invariance."""

from __future__ import annotations

import pytest
import torch

from merging.kernels.core_space import drop_and_rescale
from merging.kernels.knots import decompose_matrix, majority_sign, merge_matrix, merge_model, trim_thresholds
from merging.rng import generator_for

F64 = torch.float64
CUT = 1e-5  # the reference's absolute singular-value cut


def adapters(seed: int, n: int, m: int, ranks: list[int]):
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(n, r, generator=g, dtype=F64) for r in ranks]
    as_ = [torch.randn(r, m, generator=g, dtype=F64) for r in ranks]
    scales = (0.25 + 1.75 * torch.rand(len(ranks), generator=g, dtype=F64)).tolist()
    return bs, as_, scales, [s * b @ a for s, b, a in zip(scales, bs, as_)]


MODEL = [(0, 8, 6, [2, 2, 3]), (1, 5, 9, [1, 2, 2]), (2, 4, 4, [2, 2, 2])]  # (seed, n, m, ranks) per matrix


def model_adapters():
    return [adapters(*layer) for layer in MODEL]


def reference_knots(dense_layers: list[list[torch.Tensor]], top_k: float, lam: float) -> list[torch.Tensor]:
    """KnOTS-TIES from lora-core.md §4 on formed matrices: dense SVD of [D_1 | ... | D_T], s > 1e-5,
    X_t = diag(s) V_t^T; per task all layers flattened; keep |x| >= the (N - int(N K))-th smallest;
    sign = sign(sum_t), zero -> sign of the sum of signs; disjoint mean of lambda x; Delta = U merged."""
    bases, vectors, shapes = [], [], []
    for dense in dense_layers:
        u, s, vh = torch.linalg.svd(torch.cat(dense, 1), full_matrices=False)
        keep = s > CUT
        u, s, vh = u[:, keep], s[keep], vh[keep]
        blocks = torch.stack(vh.split(dense[0].shape[1], dim=1))  # (T, k, m)
        bases.append(u)
        vectors.append((s.reshape(1, -1, 1) * blocks).reshape(len(dense), -1))
        shapes.append(blocks.shape[1:])
    flat = torch.cat(vectors, 1)  # (T, N)
    size = flat.shape[1]
    if top_k < 1:
        kth = flat.abs().kthvalue(size - int(size * top_k), dim=1, keepdim=True).values
        flat = flat * (flat.abs() >= kth)
    sign = torch.sign(flat.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = flat * torch.where(sign > 0, flat > 0, flat < 0) * lam
    merged = selected.sum(0) / (selected != 0).sum(0).clamp(min=1)
    out, start = [], 0
    for u, shape in zip(bases, shapes):
        count = shape[0] * shape[1]
        out.append(u @ merged[start : start + count].reshape(shape))
        start += count
    return out


@pytest.mark.parametrize(("n", "m", "ranks"), [(8, 6, [2, 2, 3]), (5, 9, [1, 2, 2]), (4, 5, [3, 3])])
def test_decomposition_equals_the_dense_svd_of_the_side_by_side_stack(n, m, ranks):
    bs, as_, scales, dense = adapters(3, n, m, ranks)
    basis, reps = decompose_matrix(bs, as_, scales, min_singular_value=CUT)
    k = min(n, sum(ranks))
    assert basis.shape == (n, k) and reps.shape == (len(ranks), k, m)
    close = torch.testing.assert_close
    close(basis.T @ basis, torch.eye(k, dtype=F64), atol=1e-13, rtol=0)
    for t, d in enumerate(dense):
        close(basis @ reps[t], d, atol=1e-12, rtol=0)  # D_t = U X_t
    u_d, s_d, vh_d = torch.linalg.svd(torch.cat(dense, 1), full_matrices=False)
    signs = torch.sign((basis * u_d[:, :k]).sum(0))
    close(basis * signs, u_d[:, :k], atol=1e-10, rtol=0)
    dense_reps = s_d[:k].reshape(1, -1, 1) * torch.stack(vh_d[:k].split(m, dim=1))
    close(reps * signs.reshape(1, -1, 1), dense_reps, atol=1e-10, rtol=0)


def test_singular_values_at_or_below_the_cut_are_dropped():
    bs, as_, _, _ = adapters(4, 7, 6, [2, 2])
    basis, reps = decompose_matrix(bs, as_, [1.0, 1e-9], min_singular_value=CUT)  # task 2's values ~1e-9
    assert basis.shape[1] == 2 and reps.shape == (2, 2, 6)
    assert reps[1].abs().max() < 1e-8
    basis, reps = decompose_matrix(bs, as_, [1.0, 1e-9], min_singular_value=0.0)
    assert basis.shape[1] == 4


@pytest.mark.parametrize(("top_k", "lam"), [(0.2, 0.6), (1.0, 0.5), (0.55, 1.0)])
def test_whole_model_merge_equals_an_independent_implementation(top_k, lam):
    layers = model_adapters()
    decomposed = [decompose_matrix(bs, as_, s, min_singular_value=CUT) for bs, as_, s, _ in layers]
    merged = merge_model([d.representations for d in decomposed], [top_k] * 3, [lam] * 3, normalize=True)
    expected = reference_knots([dense for *_, dense in layers], top_k, lam)
    for d, x, want in zip(decomposed, merged, expected):
        torch.testing.assert_close(d.basis @ x, want, atol=1e-10, rtol=0)


def test_one_budget_per_task_across_layers():
    """Layer 1 is 1000x larger: at density 0.3 every kept entry of every task comes from layer 1,
    so layer 2 merges to zero (a per-layer budget would keep 30 % of it)."""
    g = torch.Generator().manual_seed(5)
    big = 1000 * torch.randn(2, 3, 10, generator=g, dtype=F64)
    small = torch.randn(2, 3, 10, generator=g, dtype=F64)
    taus = trim_thresholds([big, small], [0.3, 0.3])
    assert (taus > small.abs().max()).all()
    merged = merge_model([big, small], [0.3, 0.3], [1.0, 1.0], normalize=True)
    assert torch.equal(merged[1], torch.zeros(3, 10, dtype=F64))
    assert (merged[0] != 0).any()


def test_keep_count_is_floor_n_density_plus_one_and_density_one_keeps_all():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(6), dtype=F64)
    y = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(7), dtype=F64)
    taus = trim_thresholds([x, y], [0.25, 0.5, 1.0])  # N = 30
    flat = torch.cat([x.reshape(3, -1), y.reshape(3, -1)], 1)
    kept = (flat.abs() >= taus.reshape(-1, 1)).sum(1)
    assert kept.tolist() == [7 + 1, 15 + 1, 30]
    assert taus[2] == 0


def test_zero_mass_takes_the_sign_of_the_whole_model_majority():
    """Position 0 of layer a cancels exactly (1 - 1 = 0); its sign is filled with the sign of the
    sum of ALL elected signs of the model, so another layer decides which entry survives."""
    layer_a = torch.tensor([[[1.0, 2.0]], [[-1.0, 3.0]]], dtype=F64)  # (T=2, k=1, m=2)
    positive_b = torch.tensor([[[0.5]], [[0.25]]], dtype=F64)  # elected signs: a (0, +1), b (+1): fill +
    merged = merge_model([layer_a, positive_b], [1.0, 1.0], [1.0, 1.0], normalize=True)
    torch.testing.assert_close(merged[0], torch.tensor([[1.0, 2.5]], dtype=F64), atol=0, rtol=0)
    negative_b = -torch.ones(2, 1, 2, dtype=F64)  # elected signs: a (0, +1), b (-1, -1): fill -
    merged = merge_model([layer_a, negative_b], [1.0, 1.0], [1.0, 1.0], normalize=True)
    torch.testing.assert_close(merged[0], torch.tensor([[-1.0, 2.5]], dtype=F64), atol=0, rtol=0)
    assert majority_sign([layer_a, -positive_b], torch.zeros(2, dtype=F64)) == 0  # +1 - 1
    merged = merge_model([layer_a, -positive_b], [1.0, 1.0], [1.0, 1.0], normalize=True)
    assert merged[0][0, 0] == 0  # fill 0 keeps nothing (the reference would keep the negative entry)


def test_weights_apply_after_the_election_and_sum_versus_mean():
    x = torch.tensor([[[2.0, -1.0]], [[1.0, 0.5]]], dtype=F64)
    taus, fill = torch.zeros(2, dtype=F64), torch.tensor(1.0, dtype=F64)
    # sums: 3 (+), -0.5 (-): position 0 keeps both, position 1 keeps task 1 only
    mean = merge_matrix(x, taus, fill, [1.0, 4.0], normalize=True)
    torch.testing.assert_close(mean, torch.tensor([[(2.0 + 4.0) / 2, -1.0]], dtype=F64), atol=0, rtol=0)
    total = merge_matrix(x, taus, fill, [1.0, 4.0], normalize=False)
    torch.testing.assert_close(total, torch.tensor([[6.0, -1.0]], dtype=F64), atol=0, rtol=0)


def test_merge_is_invariant_to_joint_sign_flips_of_basis_and_representations():
    layers = model_adapters()
    decomposed = [decompose_matrix(bs, as_, s, min_singular_value=CUT) for bs, as_, s, _ in layers]
    flips = [torch.tensor([(-1.0) ** j for j in range(d.basis.shape[1])], dtype=F64) for d in decomposed]
    reps = [d.representations for d in decomposed]
    flipped = [x * f.reshape(1, -1, 1) for x, f in zip(reps, flips)]
    one = merge_model(reps, [0.3] * 3, [1.0] * 3, normalize=True)
    two = merge_model(flipped, [0.3] * 3, [1.0] * 3, normalize=True)
    for d, f, a, b in zip(decomposed, flips, one, two):
        torch.testing.assert_close(d.basis @ a, (d.basis * f) @ b, atol=1e-12, rtol=0)


def test_dare_then_ties_per_matrix_generators_are_deterministic():
    layers = model_adapters()
    reps = [decompose_matrix(bs, as_, s, min_singular_value=CUT).representations for bs, as_, s, _ in layers]

    def run(seed):
        dropped = [
            drop_and_rescale(x, [0.2] * 3, generator_for(seed, f"layer{i}"), "inverse") for i, x in enumerate(reps)
        ]
        return merge_model(dropped, [1.0] * 3, [0.4] * 3, normalize=True)

    one, two, other = run(421), run(421), run(422)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert any(not torch.equal(a, b) for a, b in zip(one, other))
    kept = drop_and_rescale(reps[0], [0.2] * 3, generator_for(421, "layer0"), "inverse")
    survivors = kept != 0
    torch.testing.assert_close(kept[survivors], reps[0][survivors] / 0.2, atol=0, rtol=0)


def test_all_zero_matrix_and_empty_model():
    zeros_b, zeros_a = [torch.zeros(4, 2, dtype=F64)] * 2, [torch.zeros(2, 3, dtype=F64)] * 2
    basis, reps = decompose_matrix(zeros_b, zeros_a, [1.0, 1.0], min_singular_value=CUT)
    assert basis.shape == (4, 0) and reps.shape == (2, 0, 3)
    bs, as_, s, _ = adapters(8, 4, 3, [2, 2])
    other = decompose_matrix(bs, as_, s, min_singular_value=CUT).representations
    merged = merge_model([reps, other], [0.5, 0.5], [1.0, 1.0], normalize=True)
    assert merged[0].shape == (0, 3) and merged[1].shape == other.shape[1:]
    assert merge_model([], [0.5], [1.0], normalize=True) == []


def test_the_cut_is_strict():
    """s_j > min_singular_value (the reference's ``s > 1e-5``): a value exactly at the cut goes."""
    b, a = torch.tensor([[0.5, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=F64), torch.eye(2, dtype=F64)
    assert decompose_matrix([b], [a], [1.0], min_singular_value=0.5).basis.shape == (3, 1)
    assert decompose_matrix([b], [a], [1.0], min_singular_value=0.4999).basis.shape == (3, 2)
