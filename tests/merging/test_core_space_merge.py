"""``merge_space: core`` through the engine: the spec's worked example (lora-core.md §5, float64)
on a one-matrix model, core-space task arithmetic equal to full-space task arithmetic on real
adapters, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.config import parse_merge_config
from merging.errors import MergeConfigError
from merging.pipeline import merge_checkpoints
from tests.merging.test_lora_factor_route import zoo  # noqa: F401  (the module-scoped adapters fixture)

KEY = "model.layers.0.mlp.w.weight"
B = [torch.tensor([[1.0], [0.5], [-1.0], [2.0]], dtype=torch.float64),
     torch.tensor([[0.5], [-1.5], [1.0], [0.25]], dtype=torch.float64)]
A = [torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64), torch.tensor([[1.0, 0.5, -1.5]], dtype=torch.float64)]


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """A base with one 4 x 3 matrix (zeros: the merged model is the merged delta) and the two
    rank-1 adapters of the worked example (alpha = r = 1, so s_t = 1)."""
    root = tmp_path_factory.mktemp("core-example")
    (root / "base").mkdir()
    save_file({KEY: torch.zeros(4, 3, dtype=torch.float64)}, str(root / "base" / "model.safetensors"))
    for t in range(2):
        folder = root / f"task{t}"
        folder.mkdir()
        prefix = "base_model.model.model.layers.0.mlp.w"
        save_file({f"{prefix}.lora_A.weight": A[t], f"{prefix}.lora_B.weight": B[t]},
                  str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                                  "target_modules": ["w"]}))
    return root


def _merge(root: Path, method: str, out: Path, models=("task0", "task1"), **params) -> torch.Tensor:
    config = parse_merge_config({"merge_method": method, "base_model": str(root / "base"), "device": "cpu",
                                 "compute_dtype": "float64", "models": [{"model": str(root / m)} for m in models],
                                 "parameters": params})
    merge_checkpoints(config, out)
    return load_file(out / "model.safetensors")[KEY]


DELTA_TA = torch.tensor([[2.5, -0.75, -0.25], [-0.5, -1.25, 2.5], [-1, 1.5, -2], [4.25, -1.875, 0.625]], dtype=torch.float64)
DELTA_ISO = torch.tensor([[2.24535, -0.430429, -0.65009], [-1.00396, -1.4621, 3.18616],
                          [-0.422518, 1.49919, -2.35951], [3.57928, -1.39524, 0.204621]], dtype=torch.float64)
# TIES in core, keeping 3 of the 4 entries of each core: the spec's numbers come from the
# reference's int(d K) + 1 count at topK = 50; mergeflow keeps floor(density * 4), so density
# 0.75 keeps the same 3 entries
DELTA_TIES = torch.tensor([[2.27028, -0.396546, -0.724972], [0.541831, -1.49082, 2.27028],
                           [-1.76173, 1.50444, -1.53169], [4.28629, -1.34704, -0.321615]], dtype=torch.float64)


def test_worked_example_task_arithmetic(example, tmp_path):
    assert torch.allclose(_merge(example, "task_arithmetic", tmp_path / "ta", merge_space="core"), DELTA_TA, atol=1e-12)


def test_worked_example_iso_c_flattens_the_adapters_span_only(example, tmp_path):
    merged = _merge(example, "iso_c", tmp_path / "iso", merge_space="core")
    assert torch.allclose(merged, DELTA_ISO, atol=1e-5)
    s = torch.linalg.svdvals(merged)
    assert torch.allclose(s[:2], torch.full((2,), 4.56837, dtype=torch.float64), atol=1e-5) and s[2] < 1e-12
    # full space: the dense definition's scale, mean over all min(n, m) = 3 singular values
    # (3.04558), on the span only (the factor route leaves out the arbitrary third direction)
    full = torch.linalg.svdvals(_merge(example, "iso_c", tmp_path / "iso-full"))
    assert torch.allclose(full[:2], torch.full((2,), 3.04558, dtype=torch.float64), atol=1e-5) and full[2] < 1e-12


def test_worked_example_ties(example, tmp_path):
    merged = _merge(example, "ties", tmp_path / "ties", merge_space="core", density=0.75)
    assert torch.allclose(merged, DELTA_TIES, atol=1e-5)


def test_core_task_arithmetic_equals_full_space_on_adapters(zoo, tmp_path):  # noqa: F811
    def run(space: str) -> dict[str, torch.Tensor]:
        config = parse_merge_config({
            "merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "compute_dtype": "float64",
            "device": "cpu", "parameters": {"merge_space": space, "lambda": 0.7},
            "models": [{"model": str(zoo[f"lora{i}"]), "parameters": {"weight": w}} for i, w in enumerate((1.0, 0.5, 0.3, 0.8))]})
        merge_checkpoints(config, tmp_path / space)
        return load_file(tmp_path / space / "model.safetensors")

    core, full = run("core"), run("full")
    assert core.keys() == full.keys()
    for key in core:
        assert torch.allclose(core[key], full[key], rtol=0, atol=1e-12), key
    assert not torch.equal(core["model.layers.0.self_attn.q_proj.weight"], load_file(zoo["base"] / "model.safetensors")[
        "model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("method", ["tsv_m", "dare_ties"])
def test_other_core_methods_run_and_stay_in_the_span(example, tmp_path, method):
    params = {"merge_space": "core"} | ({"density": 0.9} if method == "dare_ties" else {})
    merged = _merge(example, method, tmp_path / method, **params)
    assert torch.isfinite(merged).all() and merged.abs().max() > 0
    assert torch.linalg.matrix_rank(merged) <= 2  # rank <= sum of the adapters' ranks


def test_refusals(example, zoo, tmp_path):  # noqa: F811
    with pytest.raises(MergeConfigError, match="full fine-tune"):
        config = parse_merge_config({"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
                                     "models": [{"model": str(zoo["full0"])}], "parameters": {"merge_space": "core"}})
        merge_checkpoints(config, tmp_path / "a")
    with pytest.raises(MergeConfigError, match="trim_scope: model"):
        _merge(example, "ties", tmp_path / "b", merge_space="core", trim_scope="model")
    with pytest.raises(MergeConfigError, match="merge_space"):
        _merge(example, "breadcrumbs", tmp_path / "c", merge_space="core")
    assert not any((tmp_path / n).exists() for n in "abc")


def _knots_reference(base: dict, fulls: list[dict], keys: list[str], density: float, weights: list[float]) -> dict:
    """KnOTS-TIES written from lora-core.md §4, float64, dense SVDs: per matrix X_t = diag(s) V_t^T
    of H = [D_1 | ... | D_T]; per task one magnitude threshold over every matrix (keep |x| >= the
    (N - floor(N d))-th smallest); sign = sign of the weighted mass (0 -> +); mean of the agreeing
    weighted entries; Delta = U merged."""
    spaces = {}
    for key in keys:
        deltas = [f[key] - base[key] for f in fulls]
        u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
        k = int((s > 1e-5).sum())
        m = deltas[0].shape[1]
        spaces[key] = (u[:, :k], torch.stack([s[:k, None] * vh[:k, t * m:(t + 1) * m] for t in range(len(fulls))]))
    flat = torch.cat([x.reshape(len(fulls), -1).abs() for _, x in spaces.values()], dim=1)
    n = flat.shape[1]
    taus = [torch.sort(flat[t]).values[n - int(n * density) - 1] for t in range(len(fulls))]
    out = {}
    for key, (u, x) in spaces.items():
        w = torch.tensor(weights, dtype=torch.float64).reshape(-1, 1, 1)
        kept = torch.stack([torch.where(x[t].abs() >= taus[t], x[t], 0) for t in range(len(fulls))]) * w
        sign = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(kept) == sign) & (kept != 0)
        merged = (kept * agree).sum(0) / (w * agree).sum(0).clamp_min(1e-300)
        out[key] = base[key] + u @ torch.where(agree.any(0), merged, 0)
    return out


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_knots_ties_matches_an_independent_reference(zoo, tmp_path, kind):  # noqa: F811
    weights, density = [1.0, 0.5, 0.8], 0.4
    config = parse_merge_config({
        "merge_method": "ties", "base_model": str(zoo["base"]), "compute_dtype": "float64", "device": "cpu",
        "parameters": {"merge_space": "knots", "density": density},
        "models": [{"model": str(zoo[f"{kind}{i}"]), "parameters": {"weight": w}} for i, w in enumerate(weights)]})
    merge_checkpoints(config, tmp_path / kind)
    merged = load_file(tmp_path / kind / "model.safetensors")
    base = load_file(zoo["base"] / "model.safetensors")
    fulls = [load_file(zoo[f"full{i}"] / "model.safetensors") for i in range(3)]
    keys = [f"model.layers.{layer}.self_attn.{m}.weight" for layer in range(2) for m in ("q_proj", "v_proj", "o_proj")]
    expected = _knots_reference(base, fulls, keys, density, weights)
    for key in keys:
        assert torch.allclose(merged[key], expected[key], rtol=0, atol=1e-9), (key, (merged[key] - expected[key]).abs().max().item(), ((merged[key] - expected[key]).abs() > 1e-9).sum().item())
    # one budget per task across layers: the kept share differs from matrix to matrix
    assert not torch.allclose(merged[keys[0]], base[keys[0]])


def test_knots_is_refused_where_it_does_not_apply(example, tmp_path):
    with pytest.raises(MergeConfigError, match="merge_space"):
        _merge(example, "tsv_m", tmp_path / "a", merge_space="knots")
