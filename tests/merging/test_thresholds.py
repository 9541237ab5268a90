"""Whole-model trim thresholds in a streamed first pass: exact in float32 and float64."""

from types import SimpleNamespace

import pytest
import torch

from merging.registry import get_method
from merging.resolve import build_params
from merging.thresholds import global_thresholds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_model_scope_keeps_floor_nk_plus_one(dtype):
    spec = get_method("ties")
    params, models = build_params(spec, {"trim_scope": "model"}, {}, [{"density": 0.2}, {"density": 0.5}], ["a", "b"])
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(2, 10_000, generator=g, dtype=torch.float64).to(dtype) for i in range(10)}
    entries = [SimpleNamespace(name=n, kind="matrix") for n in tensors]
    thresholds, kinds = global_thresholds(spec, params, models, entries, lambda e: tensors[e.name], dtype, torch.device("cpu"))
    assert kinds == frozenset({"matrix", "other"})
    everything = torch.cat([t for t in tensors.values()], dim=1).abs()  # (2, 100000)
    assert int((everything[0] >= thresholds[0]).sum()) == 20_001  # floor(N k) + 1 without ties
    assert int((everything[1] >= thresholds[1]).sum()) == 50_001


def test_no_trim_declared():
    spec = get_method("ties")
    params, models = build_params(spec, {}, {}, [{}], ["a"])
    assert global_thresholds(spec, params, models, [], lambda e: None, torch.float32, torch.device("cpu")) == (None, frozenset())
