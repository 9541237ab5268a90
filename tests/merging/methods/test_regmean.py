"""RegMean: the worked examples of ``../shared/specs/data-aware.md`` §5 in float64, an independent
least-squares reference, and the invariants (deltas vs weights, one model, LoRA factors)."""

import logging

import numpy as np
import pytest
import torch

from merging.api import merge_tensors
from merging.errors import StatisticsError
from merging.methods.regmean import regmean_delta, regmean_lora

F64 = torch.float64
W0 = torch.tensor([[.5, -.2, .1], [.3, .4, -.6]], dtype=F64)
D1 = torch.tensor([[.2, 0, -.1], [.1, -.3, .2]], dtype=F64)
D2 = torch.tensor([[-.1, .3, .2], [0, .2, -.4]], dtype=F64)
X1 = torch.tensor([[1, 0, 2], [0, 1, 1], [2, 1, 0], [1, -1, 1]], dtype=F64)  # tokens as rows
X2 = torch.tensor([[0, 2, 1], [1, 1, -1], [-1, 0, 2], [3, 1, 1]], dtype=F64)


def gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def regmean(alpha: float, grams=None, weights=None) -> torch.Tensor:
    grams = grams or [gram(X1), gram(X2)]
    model_params = None if weights is None else [{"weight": w} for w in weights]
    return merge_tensors("regmean", W0, [W0 + D1, W0 + D2], {"alpha": alpha}, model_params, stats=grams, compute_dtype=F64)


def test_spec_grams():
    assert torch.allclose(gram(X1), torch.tensor([[1.5, .25, .75], [.25, .75, 0], [.75, 0, 1.5]], dtype=F64))
    assert torch.allclose(gram(X2), torch.tensor([[2.75, 1, 0], [1, 1.5, .5], [0, .5, 1.75]], dtype=F64))


@pytest.mark.parametrize(("alpha", "expected"), [
    (1.0, [[0.475238, 0.00761905, 0.227619], [0.446667, 0.293333, -0.686667]]),
    (0.5, [[0.494409, 0.00235623, 0.192772], [0.37918, 0.384012, -0.70406]]),
])
def test_spec_worked_example(alpha, expected):
    """spec §5 RegMean, a = 1 and a = 0.5 (6 s.f.)."""
    assert torch.allclose(regmean(alpha), torch.tensor(expected, dtype=F64), atol=5e-6)


def test_n_mismatch_mean_gram_and_sum_gram():
    """spec §5: X2 = its first 3 rows, a = 1; mean Grams by default, summed Grams = weights N_i."""
    grams = [gram(X1), gram(X2[:3])]
    mean = [[0.48357, 0.0248149, 0.248844], [0.62964, 0.330391, -0.672206]]
    summed = [[0.497753, 0.00898876, 0.232584], [0.611657, 0.303371, -0.650281]]
    assert torch.allclose(regmean(1.0, grams), torch.tensor(mean, dtype=F64), atol=5e-6)
    assert torch.allclose(regmean(1.0, grams, weights=[4, 3]), torch.tensor(summed, dtype=F64), atol=5e-6)


def _lstsq_reference(alpha: float) -> np.ndarray:
    """Independent: stack rows sqrt(a/N_i) x_t^T and sqrt(1-a) Diag(G_i)^1/2 with targets x W_i^T."""
    rows, targets = [], []
    for x, d in ((X1, D1), (X2, D2)):
        x, w = x.numpy(), (W0 + d).numpy()
        diag = np.diag(np.sqrt(np.diag(x.T @ x / len(x))))
        for block in (np.sqrt(alpha / len(x)) * x, np.sqrt(1 - alpha) * diag):
            rows.append(block)
            targets.append(block @ w.T)
    solution, *_ = np.linalg.lstsq(np.vstack(rows), np.vstack(targets), rcond=None)
    return solution.T


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1])
def test_matches_independent_least_squares(alpha):
    assert np.allclose(regmean(alpha).numpy(), _lstsq_reference(alpha), atol=1e-12)


def test_objective_below_the_mean():
    """spec §5: objective sum_i ||(W - W_i) X_i||^2 / N_i: 0.441071 (RegMean, a = 1) < 0.511875 (mean)."""
    def objective(w):
        return sum(float(((w - W0 - d) @ x.T).square().sum()) / len(x) for x, d in ((X1, D1), (X2, D2)))
    assert objective(regmean(1.0)) == pytest.approx(0.441071, abs=1e-6)
    assert objective(W0 + (D1 + D2) / 2) == pytest.approx(0.511875, abs=1e-6)


def test_deltas_equal_weights_when_s_is_invertible():
    """W0 + RegMean(D) == RegMean(W)."""
    grams, weights = torch.stack([gram(X1), gram(X2)]), torch.tensor([1.0, 2.0], dtype=F64)
    on_weights = regmean_delta(torch.stack([W0 + D1, W0 + D2]), grams, weights, 0.5)
    on_deltas = W0 + regmean_delta(torch.stack([D1, D2]), grams, weights, 0.5)
    assert torch.allclose(on_weights, on_deltas, atol=1e-14)


def test_one_model_gives_its_delta():
    out = merge_tensors("regmean", W0, [W0 + D1], {"alpha": 0.3}, stats=[gram(X1)], compute_dtype=F64)
    assert torch.allclose(out, W0 + D1, atol=1e-14)


def test_lora_factors_spec_example():
    """spec §5 LoRA: s = 1, a = 1; the merged delta is [B1|B2] A_new."""
    b = (torch.tensor([[1.0], [.5]], dtype=F64), torch.tensor([[-.5], [1.0]], dtype=F64))
    a = (torch.tensor([[.2, -.1, .3]], dtype=F64), torch.tensor([[.1, .4, -.2]], dtype=F64))
    grams, weights = torch.stack([gram(X1), gram(X2)]), torch.ones(2, dtype=F64)
    b_cat, a_new = regmean_lora(b, a, (1.0, 1.0), grams, weights, 1.0)
    expected_a = torch.tensor([[0.121333, -0.117333, 0.174667], [0.110286, 0.229143, -0.106857]], dtype=F64)
    expected = torch.tensor([[0.0661905, -0.231905, 0.228095], [0.170952, 0.170476, -0.0195238]], dtype=F64)
    assert torch.allclose(a_new, expected_a, atol=5e-6)
    assert torch.allclose(b_cat @ a_new, expected, atol=5e-6)
    dense = regmean_delta(torch.stack([b[0] @ a[0], b[1] @ a[1]]), grams, weights, 1.0)
    assert torch.allclose(b_cat @ a_new, dense, atol=1e-14)


def test_singular_s_is_solved_with_a_logged_ridge(caplog):
    x = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]], dtype=F64)  # rank 1: S singular with a = 1
    with caplog.at_level(logging.WARNING, logger="merging.methods.regmean"):
        out = regmean_delta(torch.stack([D1, D2]), torch.stack([gram(x), gram(x)]), torch.ones(2, dtype=F64), 1.0, "w")
    assert torch.isfinite(out).all() and "ridge" in caplog.text and "'w'" in caplog.text
    zero = regmean_delta(torch.stack([D1, D2]), torch.zeros(2, 3, 3, dtype=F64), torch.ones(2, dtype=F64), 1.0)
    assert torch.equal(zero, torch.zeros_like(zero))  # no Gram sees anything: the base


def test_non_linear_tensors_take_the_weighted_mean_and_embed_policy():
    base, a, b = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64), 3 * torch.ones(4, dtype=F64)
    out = merge_tensors("regmean", base, [a, b], model_params=[{"weight": 1}, {"weight": 3}], compute_dtype=F64)
    assert torch.allclose(out, 2.5 * torch.ones(4, dtype=F64))
    emb = torch.zeros(5, 3, dtype=F64)
    kept = merge_tensors("regmean", emb, [emb + 1, emb + 2], {"embed_policy": "base"}, name="model.embed_tokens.weight",
                         kind="other", compute_dtype=F64)
    assert torch.equal(kept, emb)


def test_a_matrix_without_grams_is_an_error():
    with pytest.raises(StatisticsError, match="w_q"):
        merge_tensors("regmean", W0, [W0 + D1, W0 + D2], name="w_q", compute_dtype=F64)
