"""Multi-SLERP (mergekit): weighted mean direction, tangent-space sum, exponential map, mean norm."""

import math

import pytest
import torch

from merging.api import merge_tensors
from merging.errors import MergeConfigError

F64 = torch.float64


def test_two_orthogonal_deltas_with_equal_weights_give_the_slerp_midpoint():
    """u_1 = e_1, u_2 = e_2: the tangent vectors cancel, the result is the bisector at the mean norm 2."""
    base = torch.tensor([3.0, -1.0], dtype=F64)
    out = merge_tensors("multislerp", base, [base + torch.tensor([2.0, 0.0], dtype=F64), base + torch.tensor([0.0, 2.0], dtype=F64)],
                        compute_dtype=F64)
    assert torch.allclose(out, base + torch.tensor([math.sqrt(2), math.sqrt(2)], dtype=F64), atol=1e-7)


def test_unequal_weights_by_hand():
    """Without a base the points are the models: x_1 = (1, 0), x_2 = (0, 1), weights 3 and 1
    (normalized 3/4, 1/4). m = (3, 1) / sqrt(10); v = sum_i w_i (u_i - (u_i . m) m); the result
    is exp_m(v) = m cos|v| + v sin|v| / |v| at the mean norm 1."""
    x1, x2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    w = (0.75, 0.25)
    m = torch.tensor([3.0, 1.0], dtype=F64) / math.sqrt(10)
    v = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, (x1, x2)))
    n = v.norm()
    expected = m * torch.cos(n) + v * torch.sin(n) / n
    out = merge_tensors("multislerp", x1, [x1, x2], model_params=[{"weight": 3.0}, {"weight": 1.0}], has_base=False, compute_dtype=F64)
    assert torch.allclose(out, expected, atol=1e-7)


def test_one_model_is_returned_unchanged():
    base, model = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    assert torch.allclose(merge_tensors("multislerp", base, [model], compute_dtype=F64), model)


def test_antipodal_inputs():
    """Two antipodal deltas with equal weights: mergekit's linear fallback (here: the base);
    three inputs whose directions cancel: an error naming the tensor."""
    base, d = torch.zeros(3, dtype=F64), torch.tensor([1.0, 2.0, 2.0], dtype=F64)
    assert torch.allclose(merge_tensors("multislerp", base, [d, -d], compute_dtype=F64), base)
    with pytest.raises(MergeConfigError, match="'w'.*zero"):
        merge_tensors("multislerp", base, [d, -d, 2 * d], model_params=[{"weight": 2.0}, {"weight": 3.0}, {"weight": 1.0}],
                      name="w", compute_dtype=F64)


def test_zero_weight_sum_is_an_error():
    with pytest.raises(MergeConfigError, match="sum to 0"):
        merge_tensors("multislerp", torch.zeros(2), [torch.ones(2), -torch.ones(2)], model_params=[{"weight": 1.0}, {"weight": -1.0}])


@pytest.mark.parametrize("with_base", [True, False])
def test_same_as_mergekit(with_base):
    api = pytest.importorskip("mergekit.merge_methods.api")
    base = torch.randn(12, 6, dtype=F64)
    models = [base + 0.1 * torch.randn(12, 6, dtype=F64) for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    if with_base:
        expected = api.merge_tensors([base, *models], "multislerp", parameters={"weight": weights}, base_index=0)
        out = merge_tensors("multislerp", base, models, model_params=[{"weight": w} for w in weights], compute_dtype=F64)
    else:
        expected = api.merge_tensors(models, "multislerp", parameters={"weight": weights})
        out = merge_tensors("multislerp", models[0], models, model_params=[{"weight": w} for w in weights],
                            has_base=False, compute_dtype=F64)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14)
