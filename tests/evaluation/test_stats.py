"""collect-stats: per-layer mean of squared inputs, keyed by weight name; used by scale_svd."""

from __future__ import annotations

import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from merging.api import merge_tensors


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
