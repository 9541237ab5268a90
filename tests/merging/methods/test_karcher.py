"""Karcher mean (mergekit): the geodesic mean of the directions, at the mean norm, equal weights."""

import math

import pytest
import torch

from merging.api import merge_tensors
from merging.methods.karcher import karcher_mean

F64 = torch.float64


def _on_circle(degrees: float, norm: float = 1.0) -> torch.Tensor:
    angle = math.radians(degrees)
    return torch.tensor([norm * math.cos(angle), norm * math.sin(angle)], dtype=F64)


def test_mean_angle_on_a_circle():
    """Directions at 0, 0 and 90 degrees: the Karcher mean on a circle is the mean angle, 30
    degrees (the chordal start is at atan(1/2) = 26.57); norms 1, 2, 3 give the mean norm 2."""
    points = torch.stack([_on_circle(0, 1.0), _on_circle(0, 2.0), _on_circle(90, 3.0)])
    out = karcher_mean(points, max_iter=20, tol=1e-12)
    assert torch.allclose(out, _on_circle(30, 2.0), atol=1e-10)


def test_no_iteration_gives_the_chordal_mean_direction():
    points = torch.stack([_on_circle(0), _on_circle(0), _on_circle(90)])
    assert torch.allclose(karcher_mean(points, max_iter=0, tol=1e-12), _on_circle(math.degrees(math.atan(0.5))), atol=1e-12)


def test_zero_inputs_are_left_out_of_the_direction_but_not_the_norm():
    """A zero tensor has no direction; it still counts in the mean norm (mergekit's scale)."""
    points = torch.stack([_on_circle(10, 3.0), torch.zeros(2, dtype=F64)])
    assert torch.allclose(karcher_mean(points, max_iter=10, tol=1e-12), _on_circle(10, 1.5), atol=1e-12)
    assert torch.equal(karcher_mean(torch.zeros(2, 3, dtype=F64), max_iter=10, tol=1e-5), torch.zeros(3, dtype=F64))


def test_identical_models_and_order():
    base = torch.randn(4, 4, dtype=F64)
    model = torch.randn(4, 4, dtype=F64)
    assert torch.allclose(merge_tensors("karcher", base, [model, model], compute_dtype=F64), model)
    others = [torch.randn(4, 4, dtype=F64) for _ in range(3)]
    one = merge_tensors("karcher", base, others, compute_dtype=F64)
    two = merge_tensors("karcher", base, others[::-1], compute_dtype=F64)
    assert torch.allclose(one, two, atol=1e-12)


def test_same_as_mergekit():
    api = pytest.importorskip("mergekit.merge_methods.api")
    models = [torch.randn(10, 7, dtype=F64) + 0.5 for _ in range(3)]
    expected = api.merge_tensors(models, "karcher", parameters={"max_iter": 30, "tol": 1e-9})
    out = merge_tensors("karcher", models[0], models, params={"max_iter": 30, "tol": 1e-9}, has_base=False, compute_dtype=F64)
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-12)
