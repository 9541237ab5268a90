"""``mergeflow extract-lora``: a full fine-tune as a PEFT LoRA adapter, checked with peft's own loader.

The fine-tune of a tiny Llama (with attention biases) changes every matrix by an exact rank-4
product and every 1-D tensor (norms, biases) by noise. At rank 4 the adapter reproduces it:
``PeftModel.from_pretrained(base, OUT).merge_and_unload()`` equals the fine-tune. At rank 2 the
reported error of each module equals sqrt(sum_{j>2} s_j^2 / sum_j s_j^2) of its delta's singular
values, computed here in float64 from the two checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging.extract_lora import extract_lora
from tests.conftest import tiny_llama_config

RANK = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("extract")
    config = tiny_llama_config()
    config.attention_bias = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() == 2:  # an exact rank-4 change
                u, v = torch.randn(param.shape[0], RANK, generator=g), torch.randn(RANK, param.shape[1], generator=g)
                param.add_(0.05 * u @ v)
            else:
                param.add_(0.05 * torch.randn(param.shape, generator=g))
    model.save_pretrained(root / "tuned")
    return {"base": root / "base", "tuned": root / "tuned"}


def _loaded(models, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


def test_rank_4_changes_are_extracted_exactly(models, tmp_path):
    report = extract_lora(str(models["base"]), str(models["tuned"]), tmp_path / "out", rank=RANK, embed_lora=True)
    base, tuned = load_file(models["base"] / "model.safetensors"), load_file(models["tuned"] / "model.safetensors")
    loaded = _loaded(models, tmp_path / "out")
    for key, weight in tuned.items():
        delta = weight.double() - base[key].double()
        error = float((loaded[key].double() - weight.double()).norm() / delta.norm())
        assert error < 1e-5, (key, error)
    rows = report["modules"]
    matrices = [k.removesuffix(".weight") for k, v in base.items() if v.dim() == 2]
    assert len(matrices) == 16 and all(rows[m]["rank"] == RANK and rows[m]["relative_error"] < 1e-5 for m in matrices)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == RANK and cfg["bias"] == "all" and cfg["task_type"] == "CAUSAL_LM"
    assert "model.norm" in cfg["modules_to_save"] and "lm_head" in cfg["target_modules"]
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in tensors
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in tensors  # the LoRA layer's bias
    assert json.loads((tmp_path / "out" / "adapter_report.json").read_text()) == json.loads(json.dumps(report))


def test_rank_2_reports_the_error_of_the_dropped_singular_values(models, tmp_path):
    """Through the CLI, with --max-rank and without --embed-lora: embeddings and the LM head are
    stored whole, every other matrix gets rank 2 and the error its singular values give."""
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["extract-lora", str(models["base"]), str(models["tuned"]), str(out),
                                      "--max-rank", "2", "-q"])
    assert result.exit_code == 0, result.output
    base, tuned = load_file(models["base"] / "model.safetensors"), load_file(models["tuned"] / "model.safetensors")
    rows = json.loads((out / "adapter_report.json").read_text())["modules"]
    checked = 0
    for key, weight in tuned.items():
        module = key.removesuffix(".weight")
        if weight.dim() != 2 or "embed_tokens" in key or "lm_head" in key:
            continue
        s = torch.linalg.svdvals(weight.double() - base[key].double())
        expected = float((s[2:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        assert rows[module]["rank"] == 2
        assert rows[module]["relative_error"] == pytest.approx(expected, rel=1e-4)
        assert rows[module]["energy_dropped"] == pytest.approx(expected**2, rel=1e-4)
        assert module in result.output and f"{expected:.3e}" in result.output
        checked += 1
    assert checked == 14
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(cfg["modules_to_save"])
    loaded = _loaded(models, out)
    assert torch.allclose(loaded["lm_head.weight"], tuned["lm_head.weight"], rtol=0, atol=1e-6)
