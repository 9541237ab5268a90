"""collect-stats: per-layer mean of squared inputs, keyed by weight name; used by scale_svd."""

from __future__ import annotations

import hashlib

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from merging.api import merge_tensors
from merging.io.stats import StatsFile


def test_collect_stats_and_scaled_merge(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "calib.txt"
    data.write_text("w1 w2 w3 w4\nw5 w6 w7\n\nw8 w9 w10 w11 w12\n")
    out = tmp_path / "stats.safetensors"
    result = CliRunner().invoke(app, ["collect-stats", str(tiny_models["base"]), str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    stats = load_file(out)
    assert "model.layers.0.self_attn.q_proj.weight" in stats and "lm_head.weight" in stats

    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for line in ["w1 w2 w3 w4", "w5 w6 w7", "w8 w9 w10 w11 w12"]:
            model(**tok(line, return_tensors="pt"))
    handle.remove()
    expected = torch.cat(seen).double().square().mean(dim=0).float()
    assert torch.allclose(stats["model.layers.1.mlp.down_proj.weight"], expected, rtol=1e-5)

    config = tmp_path / "scale.yml"
    models = [{"model": str(tiny_models[n])} for n in ("ft_a", "ft_b")]
    config.write_text(yaml.safe_dump({"merge_method": "scale_svd", "base_model": str(tiny_models["base"]), "models": models,
                                      "parameters": {"merge": "sum"}, "stats": str(out)}))
    assert CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "merged"), "-q"]).exit_code == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base, a, b = (load_file(tiny_models[n] / "model.safetensors") for n in ("base", "ft_a", "ft_b"))
    key = "model.layers.0.mlp.up_proj.weight"
    scaled = merge_tensors("scale_svd", base[key], [a[key], b[key]], params={"merge": "sum"}, name=key)
    assert not torch.allclose(merged[key], scaled, atol=1e-7)  # the statistics changed the decomposition
    from merging.methods import scale_svd
    from merging.resolve import build_params
    from merging.spec import TensorGroup

    params, model_params = build_params(scale_svd.SPEC, {"merge": "sum"}, {}, [{}, {}], ["a", "b"])
    group = TensorGroup(name=key, base=base[key], deltas=torch.stack([a[key] - base[key], b[key] - base[key]]),
                        model_params=model_params, stats=stats[key])
    by_hand = base[key] + scale_svd.combine(group, scale_svd.decompose(group, params), params)
    assert torch.allclose(merged[key], by_hand, atol=1e-6)


# --- gram and fisher (RegMean, Fisher merging): the fine-tuned model on its own data -----------------

TEXTS = ["w1 w2 w3 w4 w5 w6", "w7 w8", "w9 w10 w11", "w12", "w13 w14 w15 w16 w17"]


def _with_tokenizer(folder, base):
    for f in base.glob("*tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="module")
def finetuned(tiny_models, tmp_path_factory):
    from tests.conftest import save_tiny_model

    root = tmp_path_factory.mktemp("stats")
    model = _with_tokenizer(save_tiny_model(root / "ft", seed=11, base=tiny_models["base"], delta_scale=0.05),
                            tiny_models["base"])
    data = root / "task.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    return model, data


def _unpadded_inputs(model_dir, module_path: str):
    """x (tokens, in) at one Linear, each text run alone (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    seen = []
    handle = model.get_submodule(module_path).register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for text in TEXTS:
            model(**tok(text, return_tensors="pt"))
    handle.remove()
    return torch.cat(seen).double()


def test_gram_excludes_pads_and_aliases_shared_inputs(finetuned, tmp_path):
    model, data = finetuned
    out = tmp_path / "gram.safetensors"
    result = CliRunner().invoke(app, ["collect-stats", str(model), str(data), "--kind", "gram", "--batch-size", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    stats = StatsFile(out, "model 'ft'", "gram")
    for module in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        x = _unpadded_inputs(model, module)
        assert stats.token_count(f"{module}.weight") == x.shape[0] == 17  # pads (batches of 4, right-padded) excluded
        assert torch.allclose(stats.get(f"{module}.weight").double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6), module
    for layer in (0, 1):
        prefix = f"model.layers.{layer}."
        for alias in ("self_attn.k_proj", "self_attn.v_proj"):
            assert stats.aliases[prefix + alias + ".weight"] == prefix + "self_attn.q_proj.weight"
        assert stats.aliases[prefix + "mlp.up_proj.weight"] == prefix + "mlp.gate_proj.weight"
    assert torch.equal(stats.get("model.layers.0.self_attn.v_proj.weight"), stats.get("model.layers.0.self_attn.q_proj.weight"))
    with safe_open(str(out), framework="pt") as handle:
        assert "model.layers.0.self_attn.k_proj.weight" not in handle.keys()  # stored once
    assert stats.metadata["model"] == str(model) and stats.metadata["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_gram_of_base_plus_adapter_is_the_merged_model_s(tiny_models, finetuned, tmp_path):
    from tests.merging.test_lora_merge import _adapter

    base = tiny_models["base"]
    adapter, full = _adapter(base, tmp_path / "lora", 3, ["q_proj", "up_proj"])
    _with_tokenizer(full, base)
    _, data = finetuned
    grams = []
    for ref in (f"{base}+{adapter}", str(full)):
        out = tmp_path / f"{len(grams)}.safetensors"
        assert CliRunner().invoke(app, ["collect-stats", ref, str(data), "--kind", "gram", "-o", str(out)]).exit_code == 0
        grams.append(load_file(out))
    assert grams[0].keys() == grams[1].keys()
    assert all(torch.allclose(grams[0][k], grams[1][k], atol=1e-5) for k in grams[0])
    assert not torch.allclose(grams[0]["model.layers.1.mlp.down_proj.weight"],
                              load_file(_base_gram(base, data, tmp_path))["model.layers.1.mlp.down_proj.weight"], atol=1e-5)


def _base_gram(base, data, tmp_path):
    out = tmp_path / "base-gram.safetensors"
    assert CliRunner().invoke(app, ["collect-stats", str(base), str(data), "--kind", "gram", "-o", str(out)]).exit_code == 0
    return out


def test_fisher_sampled_labels_per_sequence(finetuned, tmp_path):
    """F = (1/N) sum_seq (d/dtheta sum_t log p(y^_t))^2 with y^_t sampled from the model, N scored tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = finetuned
    out = tmp_path / "fisher.safetensors"
    result = CliRunner().invoke(app, ["collect-stats", str(model_dir), str(data), "--kind", "fisher", "--seed", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    stats = StatsFile(out, "model 'ft'", "fisher")
    fisher = load_file(out)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert all(fisher[n].shape == p.shape and (fisher[n] >= 0).all() for n, p in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(3)
    key = "model.layers.1.post_attention_layernorm.weight"
    expected, tokens = torch.zeros_like(fisher[key]), 0
    for text in TEXTS:
        model.zero_grad()
        log_p = torch.log_softmax(model(**tok(text, return_tensors="pt")).logits[0], dim=-1)
        sampled = torch.multinomial(log_p.detach().exp(), 1, generator=g)
        log_p.gather(1, sampled).sum().backward()
        expected += model.get_parameter(key).grad.square()
        tokens += log_p.shape[0]
    assert stats.token_count(key) == tokens == 17
    assert torch.allclose(fisher[key], expected / tokens, rtol=1e-4, atol=1e-10)
    again = tmp_path / "again.safetensors"
    CliRunner().invoke(app, ["collect-stats", str(model_dir), str(data), "--kind", "fisher", "--seed", "3", "-o", str(again)])
    assert again.read_bytes() == out.read_bytes()  # seeded: the same file


def test_bad_kind_is_a_one_line_error(finetuned):
    model, data = finetuned
    result = CliRunner().invoke(app, ["collect-stats", str(model), str(data), "--kind", "hessian"])
    assert result.exit_code == 2 and "hessian" in result.output
