"""LoRA inputs take the factor route (SVDs from QR of the stacked factors, never of the dense
stack) and give the dense route's merge where the dense decomposition is unique
(lora-core.md §2): the same adapters merged as adapters and as the full models peft's merge
would give, in float64."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.config import parse_merge_config
from merging.pipeline import merge_checkpoints
from tests.conftest import save_tiny_model

HIDDEN, LAYERS = 16, 2
MODULES = ("q_proj", "v_proj", "o_proj")


def _adapter(folder: Path, base: dict[str, torch.Tensor], *, rank: int, alpha: float, seed: int, rslora: bool = False,
             modules=MODULES) -> dict[str, torch.Tensor]:
    """Write a PEFT LoRA adapter; return the full model peft's merge_and_unload would give."""
    g = torch.Generator().manual_seed(seed)
    scale = alpha / rank ** 0.5 if rslora else alpha / rank
    tensors, merged = {}, dict(base)
    for layer in range(LAYERS):
        for module in modules:
            key = f"model.layers.{layer}.self_attn.{module}.weight"
            out_dim, in_dim = base[key].shape
            a = torch.randn(rank, in_dim, generator=g) * 0.3
            b = torch.randn(out_dim, rank, generator=g) * 0.3
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            merged[key] = base[key].double() + scale * b.double() @ a.double()
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules), "use_rslora": rslora}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return merged


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-route")
    base_dir = save_tiny_model(root / "base", seed=0, layers=LAYERS)
    base = load_file(base_dir / "model.safetensors")
    # base as float64 so the dense route's inputs carry no float32 rounding of the products
    save_file({k: v.double() for k, v in base.items()}, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    base = load_file(base_dir / "model.safetensors")
    folders = {"base": base_dir}
    specs = [dict(rank=4, alpha=8, seed=1), dict(rank=3, alpha=3, seed=2), dict(rank=5, alpha=16, seed=3, rslora=True),
             dict(rank=4, alpha=4, seed=4)]
    for i, spec in enumerate(specs):
        merged = _adapter(root / f"lora{i}", base, **spec)
        full = root / f"full{i}"
        full.mkdir()
        save_file({k: v.double() for k, v in merged.items()}, str(full / "model.safetensors"), metadata={"format": "pt"})
        (full / "config.json").write_text((base_dir / "config.json").read_text())
        folders[f"lora{i}"], folders[f"full{i}"] = root / f"lora{i}", full
    return folders


def _merge(zoo, kind: str, count: int, method: str, out: Path, **params) -> dict[str, torch.Tensor]:
    config = parse_merge_config({
        "merge_method": method, "base_model": str(zoo["base"]), "compute_dtype": "float64", "device": "cpu",
        "models": [{"model": str(zoo[f"{kind}{i}"])} for i in range(count)], "parameters": params})
    merge_checkpoints(config, out)
    return load_file(out / "model.safetensors")


def _assert_close(a: dict, b: dict, rtol: float) -> None:
    for key in a:
        scale = max(b[key].abs().max().item(), 1e-12)
        assert (a[key] - b[key]).abs().max().item() <= rtol * scale, key


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_drm_factor_route_equals_the_dense_route(zoo, tmp_path, monkeypatch, direction):
    import merging.methods.drm as drm

    calls = []
    real = drm.drm_factors
    monkeypatch.setattr(drm, "drm_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    params = {"direction": direction, "svd_dtype": "float64", "singular_matrices_drop_rate": 0.5}
    lora = _merge(zoo, "lora", 4, "drm", tmp_path / "lora", **params)
    assert len(calls) == LAYERS * len(MODULES), "every LoRA matrix takes the factor route"
    calls.clear()
    dense = _merge(zoo, "full", 4, "drm", tmp_path / "dense", **params)
    assert not calls, "full fine-tunes take the dense route"
    _assert_close(lora, dense, 1e-9)


def test_tsv_m_of_one_adapter_is_that_adapter_on_both_routes(zoo, tmp_path):
    lora = _merge(zoo, "lora", 1, "tsv_m", tmp_path / "lora1")  # T = 1: k = 16 > r = 4
    dense = _merge(zoo, "full", 1, "tsv_m", tmp_path / "dense1")
    # one task: TSV-M is polar(U_k) diag(s_k) polar(V_k^T); the dense route's 12 null columns
    # carry singular value 0, so the product is the same delta: the adapter's own
    _assert_close(lora, dense, 1e-9)


def test_tsv_m_factor_route_keeps_only_each_tasks_nonzero_triplets(zoo, tmp_path):
    """T = 2, k = 8 > r_t: the factor route takes each task's r_t triplets (the dense route
    would add null vectors); checked against that definition computed densely here."""
    from merging.kernels.svd import polar

    lora = _merge(zoo, "lora", 2, "tsv_m", tmp_path / "lora")
    base = load_file(zoo["base"] / "model.safetensors")
    fulls = [load_file(zoo[f"full{i}"] / "model.safetensors") for i in range(2)]
    key = "model.layers.1.self_attn.v_proj.weight"
    us, ss, vhs = [], [], []
    for full, rank in zip(fulls, (4, 3)):
        u, s, vh = torch.linalg.svd(full[key] - base[key])
        us.append(u[:, :rank]), ss.append(s[:rank]), vhs.append(vh[:rank])
    expected = base[key] + (polar(torch.cat(us, 1)) * torch.cat(ss)) @ polar(torch.cat(vhs, 0))
    assert torch.allclose(lora[key], expected, rtol=0, atol=1e-9)


def test_mixed_inputs_fall_back_to_the_dense_route(zoo, tmp_path, monkeypatch):
    import merging.methods.drm as drm

    calls = []
    real = drm.drm_factors
    monkeypatch.setattr(drm, "drm_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = parse_merge_config({
        "merge_method": "drm", "base_model": str(zoo["base"]), "compute_dtype": "float64", "device": "cpu",
        "models": [{"model": str(zoo["lora0"])}, {"model": str(zoo["full1"])}]})
    merge_checkpoints(config, tmp_path / "out")
    assert not calls


def test_rank_one_drm_inputs_are_warned_about(tmp_path, caplog):
    base_dir = save_tiny_model(tmp_path / "base", seed=0, layers=LAYERS)
    base = load_file(base_dir / "model.safetensors")
    for i in range(2):
        _adapter(tmp_path / f"r1_{i}", base, rank=1, alpha=1, seed=10 + i, modules=("q_proj",))
    config = parse_merge_config({"merge_method": "drm", "base_model": str(base_dir), "device": "cpu",
                                 "models": [{"model": str(tmp_path / f"r1_{i}")} for i in range(2)]})
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(config, tmp_path / "out")
    assert any("rank-1" in r.getMessage() for r in caplog.records)


def test_iso_c_factor_route_is_the_unique_part_of_the_dense_result(zoo, tmp_path):
    """Dense Iso-C of LoRA deltas lifts every null direction of the sum to mean(s) (an arbitrary
    completion); the factor route keeps the same scale on the adapters' span: it equals the
    dense result projected on that span, U_R U_R^T (dense Iso-C)."""
    lora = _merge(zoo, "lora", 2, "iso_c", tmp_path / "lora")  # ranks 4 + 3 < 16: the sum has null directions
    dense = _merge(zoo, "full", 2, "iso_c", tmp_path / "dense")
    base = load_file(zoo["base"] / "model.safetensors")
    for layer in range(LAYERS):
        for module in MODULES:
            key = f"model.layers.{layer}.self_attn.{module}.weight"
            total = sum(load_file(zoo[f"full{i}"] / "model.safetensors")[key] - base[key] for i in range(2))
            u, s, _ = torch.linalg.svd(total)
            span = u[:, : int((s > 1e-9 * s[0]).sum())]
            projected = span @ span.T @ (dense[key] - base[key])
            assert torch.allclose(lora[key] - base[key], projected, rtol=0, atol=1e-9), key
            assert torch.linalg.matrix_rank(lora[key] - base[key]) == 7 < torch.linalg.matrix_rank(dense[key] - base[key])


def _iso_cts_reference(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Iso-CTS over the non-null triplets only, from dense float64 SVDs (an independent route)."""
    from merging.methods.iso import subspace_sizes

    m, n = deltas[0].shape
    r = min(m, n)
    kc, kt = subspace_sizes(r, len(deltas), fraction)
    u, s, vh = torch.linalg.svd(sum(deltas))
    tol = 1e-9 * s[0]
    kc = min(kc, int((s > tol).sum()))
    us, ss, vhs = [], [], []
    for d in deltas:
        ru, rs, rvh = torch.linalg.svd(d - u[:, :kc] @ (u[:, :kc].T @ d))
        keep = min(kt, int((rs > tol).sum()))
        us, ss, vhs = us + [ru[:, :keep]], ss + [rs[:keep]], vhs + [rvh[:keep]]
    u_cat, vh_cat = torch.cat([*us, u[:, :kc]], dim=1), torch.cat([*vhs, vh[:kc]], dim=0)

    def polar(x: torch.Tensor) -> torch.Tensor:  # over the non-zero singular values only
        p, sv, qh = torch.linalg.svd(x, full_matrices=False)
        k = int((sv > 1e-9 * sv[0]).sum())
        return p[:, :k] @ qh[:k]

    return torch.cat([*ss, s[:kc]]).sum() / r * polar(u_cat) @ polar(vh_cat)


def test_iso_cts_factor_route_equals_the_dense_route_where_every_slot_is_filled(zoo, tmp_path, monkeypatch):
    """Four adapters of ranks 4 + 3 + 5 + 4 = 16 = min(m, n): every common and task slot holds
    a non-zero singular value, the dense decomposition is unique and both routes agree."""
    import merging.methods.iso as iso

    dense_calls = []
    real = iso.iso_cts_factors
    # (the matrices no adapter touches have all-zero deltas and take the dense route: not counted)
    monkeypatch.setattr(iso, "iso_cts_factors", lambda d, f: dense_calls.append(bool(d.any())) or real(d, f))
    lora = _merge(zoo, "lora", 4, "iso_cts", tmp_path / "lora")
    assert not any(dense_calls), "LoRA matrices take the factor route"
    dense = _merge(zoo, "full", 4, "iso_cts", tmp_path / "dense")
    assert sum(dense_calls) == LAYERS * len(MODULES)
    _assert_close(lora, dense, 1e-9)


def test_iso_cts_factor_route_fills_only_the_adapters_span(zoo, tmp_path):
    """Two adapters (R = 7 < 16): the dense route fills 9 slots with arbitrary directions; the
    factor route is Iso-CTS over the non-null triplets (checked against dense float64 SVDs)."""
    lora = _merge(zoo, "lora", 2, "iso_cts", tmp_path / "lora", common_space_fraction=0.5)
    base = load_file(zoo["base"] / "model.safetensors")
    for layer in range(LAYERS):
        for module in MODULES:
            key = f"model.layers.{layer}.self_attn.{module}.weight"
            deltas = [load_file(zoo[f"full{i}"] / "model.safetensors")[key] - base[key] for i in range(2)]
            expected = _iso_cts_reference(deltas, 0.5)
            assert torch.allclose(lora[key] - base[key], expected, rtol=0, atol=1e-9 * expected.abs().max()), key
            assert torch.linalg.matrix_rank(lora[key] - base[key]) <= 7


def test_scale_svd_of_low_rank_adapters_is_iso_cts_of_them_without_iterations(zoo, tmp_path, monkeypatch):
    """A task of rank r_t <= k is its own rank-k part: the cleaning is the identity, so Scale-SVD
    of LoRA inputs is Iso-CTS of them (factor route, no alternating SVDs), and where the dense
    decomposition is unique (R = min(m, n)) it equals the dense route, iterations included."""
    import merging.methods.scale_svd as scale_svd

    iterations = []
    real = scale_svd.low_rank_plus_sparse
    monkeypatch.setattr(scale_svd, "low_rank_plus_sparse", lambda w, *a: iterations.append(bool(w.any())) or real(w, *a))
    params = {"rank_ratio": 1.0, "sparsity": 0.0}  # k = 8 (16 x 16) or 5 (8 x 16) >= every rank
    lora = _merge(zoo, "lora", 4, "scale_svd", tmp_path / "lora", **params)
    assert not any(iterations)
    _assert_close(lora, _merge(zoo, "lora", 4, "iso_cts", tmp_path / "iso"), 1e-12)
    _assert_close(lora, _merge(zoo, "full", 4, "scale_svd", tmp_path / "dense", **params), 1e-9)
    assert any(iterations)


@pytest.mark.parametrize("method, params, model_params", [
    ("task_arithmetic", {}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": -0.3}]),
    ("task_arithmetic", {"normalize": True}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.7}]),
    ("drm", {"direction": "horizontal", "singular_matrices_drop_rate": 0.6, "svd_dtype": "float64"}, [{"coefficient": 1.0}] * 3),
    ("drm", {"direction": "vertical", "singular_matrices_drop_rate": 0.3, "svd_dtype": "float64"}, [{"coefficient": 0.8}, {"coefficient": 1.2},
                                                                           {"coefficient": 1.0}]),
])
def test_combine_factors_is_the_dense_combine_as_a_product(method, params, model_params):
    """A method's combine_factors gives (b, a) with b @ a = its dense combine's merged delta,
    from the factors alone (the group's deltas and base are shape-only meta tensors)."""
    from merging.registry import get_method
    from merging.rng import generator_for
    from merging.spec import LoraFactors, TensorGroup

    spec = get_method(method)
    g = torch.Generator().manual_seed(5)
    ranks, n, m = (3, 2, 4), 12, 9
    lora = LoraFactors(tuple(torch.randn(n, r, generator=g, dtype=torch.float64) for r in ranks),
                       tuple(torch.randn(r, m, generator=g, dtype=torch.float64) for r in ranks), (2.0, 0.5, 1.0))
    dense = torch.stack([s * b @ a for b, a, s in zip(lora.b, lora.a, lora.scales)])
    shared = spec.params.model_validate(params)
    per_model = tuple(spec.model_params.model_validate(p) for p in model_params)

    def run(group):
        factors = spec.decompose(group, shared)
        return spec.sparsify(group, factors, shared, generator_for(0, "w"))

    full = TensorGroup("w", torch.zeros(n, m, dtype=torch.float64), dense, per_model, lora=lora)
    expected = spec.combine(full, run(full), shared)
    meta = TensorGroup("w", torch.empty(n, m, dtype=torch.float64, device="meta"),
                       torch.empty(3, n, m, dtype=torch.float64, device="meta"), per_model, lora=lora)
    assert spec.factors_when(shared)
    b, a = spec.combine_factors(meta, run(meta), shared)
    assert b.shape[1] <= sum(ranks)
    torch.testing.assert_close(b @ a, expected.double(), rtol=0, atol=1e-12)
