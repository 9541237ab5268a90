"""The CUDA path (``device: cuda``), where a GPU is present (marked ``gpu``; skipped without
CUDA): every method's CUDA output against the CPU's at small shapes (benchmarks/gpu_check.py
runs the same at Llama-3-8B shapes), a whole merge on both devices, and the gesvd fallback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging.config import parse_merge_config
from merging.pipeline import merge_checkpoints

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_on_cuda_matches_the_cpu():
    check = _gpu_check()
    rows = check.compare_methods("cuda", check.QUICK, {"q_proj", "k_proj", "down_proj", "input_layernorm"},
                                 {"q_proj", "k_proj", "down_proj"})
    assert not [r for r in rows if not r["ok"]]


def test_gesvd_fallback_runs_on_cuda():
    assert _gpu_check().check_gesvd_fallback("cuda")["ok"]


@pytest.mark.parametrize("method,parameters", [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}),
                                               ("drm", {"singular_matrices_drop_rate": 0.6})])
def test_a_merge_on_cuda_matches_the_cpu(tiny_models, tmp_path, method, parameters):
    out = {}
    for device in ("cpu", "cuda"):
        config = parse_merge_config({"merge_method": method, "base_model": str(tiny_models["base"]), "device": device,
                                     "models": [{"model": str(tiny_models[n])} for n in ("ft_a", "ft_b", "ft_c")],
                                     "parameters": parameters})
        out[device] = load_file(merge_checkpoints(config, tmp_path / device) / "model.safetensors")
    base = load_file(tiny_models["base"] / "model.safetensors")
    for key, want in out["cpu"].items():
        delta = want.double() - base[key].double()
        error = float((out["cuda"][key].double() - want.double()).norm() / delta.norm().clamp_min(1e-30))
        assert error <= (1e-4 if method == "drm" else 1e-5), (key, error)
