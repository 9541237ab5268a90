"""Fisher merging: the worked example of ``../shared/specs/data-aware.md`` §5 in float64 (exact
Fisher of a 2-class logit model), normalised and not, and the edge cases."""

import pytest
import torch

from merging.api import merge_tensors
from merging.errors import StatisticsError
from merging.methods.fisher import fisher_delta

F64 = torch.float64
W0 = torch.tensor([[.5, -.2, .1], [.3, .4, -.6]], dtype=F64)
D1 = torch.tensor([[.2, 0, -.1], [.1, -.3, .2]], dtype=F64)
D2 = torch.tensor([[-.1, .3, .2], [0, .2, -.4]], dtype=F64)
X1 = torch.tensor([[1, 0, 2], [0, 1, 1], [2, 1, 0], [1, -1, 1]], dtype=F64)
X2 = torch.tensor([[0, 2, 1], [1, 1, -1], [-1, 0, 2], [3, 1, 1]], dtype=F64)


def exact_fisher(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """F[k, j] = mean_n p_k (1 - p_k) x_j^2 for logits W x over 2 classes."""
    p = torch.softmax(x @ w.T, dim=1)  # (N, 2)
    return (p * (1 - p)).T @ x.square() / x.shape[0]


F1, F2 = exact_fisher(W0 + D1, X1), exact_fisher(W0 + D2, X2)


def test_spec_fisher_values():
    assert torch.allclose(F1[0], torch.tensor([0.340454, 0.172612, 0.298867], dtype=F64), atol=5e-7)
    assert torch.allclose(F2[1], torch.tensor([0.47176, 0.323952, 0.210712], dtype=F64), atol=5e-7)
    assert float(F1.norm()) == pytest.approx(0.685602, abs=1e-6) and float(F2.norm()) == pytest.approx(0.86244, abs=1e-5)


@pytest.mark.parametrize(("normalize", "expected"), [
    (False, [[0.52575, -0.00428381, 0.124051], [0.341917, 0.426194, -0.648102]]),
    (True, [[0.542752, -0.0203879, 0.107751], [0.347584, 0.399354, -0.615501]]),
])
def test_spec_worked_example(normalize, expected):
    """spec §5 Fisher: l = (.5, .5), eps 1e-6."""
    out = merge_tensors("fisher", W0, [W0 + D1, W0 + D2], {"normalize": normalize},
                        [{"weight": .5}, {"weight": .5}], stats=[F1, F2], compute_dtype=F64)
    assert torch.allclose(out, torch.tensor(expected, dtype=F64), atol=5e-6)


def test_deltas_equal_weights_and_one_model():
    weights = torch.tensor([1.0, 3.0], dtype=F64)
    fishers = torch.stack([F1, F2])
    on_weights = fisher_delta(torch.stack([W0 + D1, W0 + D2]), fishers, weights, 1e-6)
    assert torch.allclose(on_weights, W0 + fisher_delta(torch.stack([D1, D2]), fishers, weights, 1e-6), atol=1e-15)
    one = merge_tensors("fisher", W0, [W0 + D1], stats=[F1], compute_dtype=F64)
    assert torch.allclose(one, W0 + D1, atol=1e-15)


def test_entries_no_fisher_reaches_keep_the_base():
    zero = torch.zeros_like(F1)
    out = fisher_delta(torch.stack([D1, D2]), torch.stack([zero, F2]), torch.ones(2, dtype=F64), 0.0)
    assert torch.allclose(out, D2)  # model 1's Fisher is zero: model 2 alone
    none = fisher_delta(torch.stack([D1, D2]), torch.stack([zero, zero]), torch.ones(2, dtype=F64), 0.0)
    assert torch.equal(none, torch.zeros_like(none))


def test_zero_fisher_with_normalize_names_the_tensor():
    with pytest.raises(StatisticsError, match="w_q"):
        merge_tensors("fisher", W0, [W0 + D1, W0 + D2], name="w_q", stats=[torch.zeros_like(F1), F2], compute_dtype=F64)
    with pytest.raises(StatisticsError, match="w_q"):
        merge_tensors("fisher", W0, [W0 + D1, W0 + D2], name="w_q", compute_dtype=F64)
