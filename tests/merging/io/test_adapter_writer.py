"""A merge of LoRA adapters written as a PEFT adapter (``out_format: peft``) is the merge itself.

Adapters are made with peft 0.21 on a tiny Llama (ranks 4, 2, 3, 4; alphas differ; one rsLoRA; one
with ``modules_to_save`` of the LM head and the input norms; one with an embedding LoRA), merged
by the engine into a PEFT adapter and into a Hugging Face folder. The adapter is loaded with
peft's own ``PeftModel.from_pretrained`` on the base and ``merge_and_unload()``ed; every weight
must equal the Hugging Face merge (relative to the delta, 1e-5), and each LoRA module's delta
the sum of the inputs' ``s_t B_t A_t`` computed here in float64 from the adapter files.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from merging.config import parse_merge_config
from merging.errors import CheckpointMismatchError, MergeConfigError
from merging.pipeline import merge_checkpoints
from tests.conftest import save_tiny_model, tiny_llama_config

HIDDEN = 16
ATTENTION = ("q_proj", "v_proj", "o_proj")
ADAPTERS = {  # name: LoraConfig arguments, and which extra tensors training changed
    "a": dict(r=4, lora_alpha=8, target_modules=list(ATTENTION)),
    "b": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=list(ATTENTION)),
    "c": dict(r=3, lora_alpha=6, target_modules=list(ATTENTION), modules_to_save=["lm_head", "input_layernorm"]),
    "e": dict(r=4, lora_alpha=4, target_modules=[*ATTENTION, "embed_tokens"]),
}


def _base_model(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapter-out")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(hidden=HIDDEN)).save_pretrained(root / "base")
    folders = {"base": root / "base"}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items(), start=1):
        model = get_peft_model(_base_model(root / "base"), LoraConfig(**kwargs))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key or "modules_to_save" in key:
                    param.add_(0.1 * torch.randn(param.shape, generator=g))
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def _config(zoo, method: str, names: str, **extra):
    models = [{"model": str(zoo[n]), "parameters": extra.pop(f"params_{n}", {})} for n in names]
    return parse_merge_config({"merge_method": method, "base_model": str(zoo["base"]), "device": "cpu",
                               "models": models, **extra})


def _peft_merged(zoo, folder: Path) -> dict[str, torch.Tensor]:
    return PeftModel.from_pretrained(_base_model(zoo["base"]), folder).merge_and_unload().state_dict()


def _assert_equal_merges(zoo, config, tmp_path, rtol=1e-5) -> dict[str, torch.Tensor]:
    """Merge ``config`` both ways; peft's loaded adapter equals the HF merge, tensor by tensor."""
    merge_checkpoints(config, tmp_path / "hf")
    merge_checkpoints(config.model_copy(update={"out_format": "peft"}), tmp_path / "peft")
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    base = load_file(zoo["base"] / "model.safetensors")
    loaded = _peft_merged(zoo, tmp_path / "peft")
    for key, weight in hf.items():
        want, got = (weight.double() - base[key].double()), (loaded[key].double() - base[key].double())
        scale = max(float(want.norm()), 1e-30)
        assert float((got - want).norm()) <= rtol * scale, (key, float((got - want).norm()) / scale)
    return hf


def _file_factors(folder: Path, module: str):
    """(B, A, s) of ``module`` in an input adapter, from its files, in float64."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
    r = a.shape[0]
    return b, a, cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)


def test_task_arithmetic_adapter_is_the_merge(zoo, tmp_path):
    """Weights 0.7 / 1 / 0.5 / 1 and lambda 0.8 over all four adapters: LoRA modules of rank
    min(n, m, sum r_t), the changed LM head and norms in modules_to_save, the embedding LoRA as
    lora_embedding_A/B, rank patterns that peft's own get_pattern_key resolves to each module."""
    weights = {"a": 0.7, "b": 1.0, "c": 0.5, "e": 1.0}
    config = _config(zoo, "task_arithmetic", "abce", parameters={"lambda": 0.8},
                     **{f"params_{n}": {"weight": w} for n, w in weights.items()})
    _assert_equal_merges(zoo, config, tmp_path)
    out = tmp_path / "peft"
    cfg = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    assert cfg["use_rslora"] is False and cfg["modules_to_save"] == ["lm_head", "model.layers.0.input_layernorm",
                                                                     "model.layers.1.input_layernorm"]
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in tensors
    report = json.loads((out / "adapter_report.json").read_text())
    for layer in range(2):
        for name in ATTENTION:
            module = f"model.layers.{layer}.self_attn.{name}"
            dense = 0
            for n, w in weights.items():
                b, a, s = _file_factors(zoo[n], module)
                dense = dense + 0.8 * w * s * (b @ a)
            rank = min(*dense.shape, sum(ADAPTERS[n]["r"] for n in weights))
            key = get_pattern_key(list(cfg["rank_pattern"]), module)
            assert cfg["rank_pattern"].get(key, cfg["r"]) == cfg["alpha_pattern"].get(key, cfg["lora_alpha"]) == rank
            if key in cfg["rank_pattern"]:
                assert re.fullmatch(key, module)
            lora_a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
            lora_b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
            error = float((lora_b @ lora_a - dense).norm() / dense.norm())
            assert error <= 1e-5, (module, error)
            assert report["modules"][module]["rank"] == rank
            assert report["modules"][module]["relative_error"] == pytest.approx(error, abs=1e-6)


@pytest.mark.parametrize(("method", "parameters"), [
    ("drm", {}),
    ("drm", {"direction": "vertical", "singular_matrices_drop_rate": 0.5}),
    ("ties", {"merge_space": "core", "density": 0.5}),
    ("tsv_m", {}),
])
def test_span_keeping_methods_give_the_merge_as_an_adapter(zoo, tmp_path, method, parameters):
    _assert_equal_merges(zoo, _config(zoo, method, "abc", parameters=parameters), tmp_path)
    ranks = json.loads((tmp_path / "peft" / "adapter_report.json").read_text())["modules"]
    assert all(row["rank"] is None or row["rank"] <= 9 for row in ranks.values())


def test_adapter_rank_truncates_and_reports_the_energy_dropped(zoo, tmp_path):
    """``--adapter-rank 3`` through the CLI: every module of rank <= 3, the energy dropped and the
    error reported per module equal those of the singular values of the dense merged delta
    (float64, from the HF merge), and the stdout line gives their max and mean."""
    from typer.testing import CliRunner

    from flows.cli import app

    config = _config(zoo, "task_arithmetic", "ab")
    (tmp_path / "merge.yml").write_text(config.to_yaml())
    merge_checkpoints(config, tmp_path / "hf")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "merge.yml"), str(tmp_path / "peft"), "--out-format",
                                      "peft", "--adapter-rank", "3", "-q"])
    assert result.exit_code == 0, result.output
    hf, base = load_file(tmp_path / "hf" / "model.safetensors"), load_file(zoo["base"] / "model.safetensors")
    report = json.loads((tmp_path / "peft" / "adapter_report.json").read_text())
    energies = []
    for module, row in report["modules"].items():
        key = f"{module}.weight"
        s = torch.linalg.svdvals(hf[key].double() - base[key].double())
        energy = float((s[3:] ** 2).sum() / (s**2).sum())
        assert row["rank"] == 3
        assert row["energy_dropped"] == pytest.approx(energy, rel=1e-4, abs=1e-9)
        assert row["relative_error"] == pytest.approx(energy**0.5, rel=1e-4)
        energies.append(energy)
    assert min(energies) > 0.01
    assert f"max {max(energies):.3g}, mean {sum(energies) / len(energies):.3g}" in result.output
    loaded = _peft_merged(zoo, tmp_path / "peft")
    for module in report["modules"]:  # what peft loads is the stored rank-3 factors
        assert torch.linalg.matrix_rank(loaded[f"{module}.weight"].double() - base[f"{module}.weight"].double(),
                                        rtol=1e-5) == 3


def test_full_space_ties_needs_adapter_rank(zoo, tmp_path):
    config = _config(zoo, "ties", "ab", parameters={"density": 0.5}, out_format="peft")
    with pytest.raises(MergeConfigError, match="--adapter-rank") as err:
        merge_checkpoints(config, tmp_path / "refused")
    assert "\n" not in str(err.value) and not (tmp_path / "refused").exists()
    merge_checkpoints(config.model_copy(update={"adapter_rank": 4}), tmp_path / "peft")
    merge_checkpoints(config.model_copy(update={"out_format": "hf"}), tmp_path / "hf")
    hf, base = load_file(tmp_path / "hf" / "model.safetensors"), load_file(zoo["base"] / "model.safetensors")
    loaded = _peft_merged(zoo, tmp_path / "peft")
    report = json.loads((tmp_path / "peft" / "adapter_report.json").read_text())["modules"]
    assert len(report) == 6
    for module, row in report.items():
        key = f"{module}.weight"
        dense = hf[key].double() - base[key].double()
        s = torch.linalg.svdvals(dense)
        best = float((s[4:] ** 2).sum().sqrt() / dense.norm())  # Eckart-Young: the truncated SVD's error
        got = float((loaded[key].double() - base[key].double() - dense).norm() / dense.norm())
        assert row["rank"] == 4 and got == pytest.approx(best, rel=1e-4) and row["relative_error"] == pytest.approx(best, rel=1e-4)


def _header_only(source: Path, target: Path) -> Path:
    """A copy of a model folder whose safetensors file keeps its header and drops its data."""
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    raw = (source / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    (target / "model.safetensors").write_bytes(raw[: 8 + length])
    return target


def test_a_header_only_base_serves_an_adapter_output_only(zoo, tmp_path):
    shapes = _header_only(zoo["base"], tmp_path / "shapes")
    config = _config(zoo, "drm", "ab", out_format="peft")
    merge_checkpoints(config, tmp_path / "full-base")
    merge_checkpoints(config.model_copy(update={"base_model": str(shapes)}), tmp_path / "header-base")
    a, b = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("full-base", "header-base"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointMismatchError, match="no tensor data") as err:
        merge_checkpoints(config.model_copy(update={"base_model": str(shapes), "out_format": "hf"}), tmp_path / "hf")
    assert "out_format: peft" in str(err.value)
    with_whole = _config(zoo, "task_arithmetic", "ac", out_format="peft").model_copy(update={"base_model": str(shapes)})
    with pytest.raises(CheckpointMismatchError, match="holds tensor headers only"):  # c's modules_to_save needs W0
        merge_checkpoints(with_whole, tmp_path / "whole")
    assert not any(p.name.startswith(("hf", "whole")) for p in tmp_path.iterdir())


def test_full_model_inputs_are_refused(zoo, tmp_path):
    zoo = {**zoo, "f": save_tiny_model(tmp_path / "full", seed=3, base=zoo["base"])}
    with pytest.raises(MergeConfigError, match="every input to be a LoRA adapter"):
        merge_checkpoints(_config(zoo, "task_arithmetic", "af", out_format="peft"), tmp_path / "out")


@pytest.mark.parametrize("method", ["task_arithmetic", "drm", "tsv_m"])
def test_an_adapter_output_forms_no_dense_delta_it_does_not_need(zoo, tmp_path, monkeypatch, method):
    """Tensors no adapter touches are never merged (no (T, vocab, hidden) stack of zeros for the
    embeddings), and methods with combine_factors (task arithmetic, DRM) form no dense delta at
    all: their merged deltas go to the adapter as factors. Their values are checked against dense
    merges above."""
    from merging.context import MergeContext

    computed = []
    real = MergeContext.deltas
    monkeypatch.setattr(MergeContext, "deltas", lambda self, entry: computed.append(entry.name) or real(self, entry))
    merge_checkpoints(_config(zoo, method, "ab", out_format="peft"), tmp_path / "out")
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved and all(".lora_" in k for k in saved)
    if method == "tsv_m":  # no combine_factors: the touched matrices only
        assert computed and not any("embed_tokens" in n or "norm" in n or "lm_head" in n for n in computed)
        assert all(any(name.removesuffix(".weight") in k for k in saved) for name in computed)
    else:
        assert computed == []


def test_product_factors_are_an_exact_balanced_split_and_truncate_by_energy():
    from merging.io.adapter_writer import factored_error, product_factors

    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g, dtype=torch.float64)
    b[:, 5] = b[:, 0]  # rank 5, not 6: one zero singular value is dropped
    dense = b @ a
    full = product_factors(b, a)
    assert full.b.shape[1] == 5 and torch.allclose(full.b @ full.a, dense, atol=1e-12)
    assert torch.allclose(full.b.T @ full.b, full.a @ full.a.T, atol=1e-10)  # balanced: B^T B = A A^T = S
    s = torch.linalg.svdvals(dense)
    truncated = product_factors(b, a, rank=2)
    assert truncated.energy_dropped == pytest.approx(float((s[2:] ** 2).sum() / (s**2).sum()), rel=1e-9)
    assert factored_error(b, a, truncated.b, truncated.a) == pytest.approx(
        float(torch.linalg.matrix_norm(dense - truncated.b @ truncated.a) / torch.linalg.matrix_norm(dense)), rel=1e-9)
    assert product_factors(b * 0, a).b.shape[1] == 0
