"""Modules of multi-modal models: which tensors each module owns, its layer-count key, the
per-module merge, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merging import merge_checkpoints, parse_merge_config
from merging.errors import MergeConfigError
from merging.modules import assign_modules, layer_count_key

QWEN2_VL_NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight",
                  "lm_head.weight", "visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight",
                  "visual.merger.ln_q.weight", "visual.merger.mlp.0.weight"]


def test_the_longest_prefix_decides_the_module():
    found = assign_modules(QWEN2_VL_NAMES, ["text_decoder", "vision_tower", "multi_modal_projector"], "model 'q'")
    assert found == {
        "text_decoder": ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight",
                         "lm_head.weight"],
        "vision_tower": ["visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight"],
        "multi_modal_projector": ["visual.merger.ln_q.weight", "visual.merger.mlp.0.weight"]}


def test_a_module_left_out_is_refused_by_name_not_dropped_or_absorbed():
    # the projector's tensors sit under the vision tower's 'visual.' too: they must not be merged as the tower's
    with pytest.raises(MergeConfigError, match=r"'visual\.merger\.ln_q\.weight'.*'multi_modal_projector'.*does not list"):
        assign_modules(QWEN2_VL_NAMES, ["text_decoder", "vision_tower"], "model 'q'")
    with pytest.raises(MergeConfigError, match=r"'audio\.conv\.weight'.*no module"):
        assign_modules(["audio.conv.weight", "lm_head.weight"], ["text_decoder"], "model 'q'")
    with pytest.raises(MergeConfigError, match=r"modules\.visoin_tower: .*no tensor"):
        assign_modules(["lm_head.weight"], ["text_decoder", "visoin_tower"], "model 'q'")


def test_any_module_name_stands_for_its_own_prefix():
    found = assign_modules(["audio_tower.layers.0.w", "model.audio_tower.x", "lm_head.weight"],
                           ["text_decoder", "audio_tower"], "model 'q'")
    assert found["audio_tower"] == ["audio_tower.layers.0.w", "model.audio_tower.x"]


@pytest.mark.parametrize("config, module, key", [
    ({"text_config": {"num_hidden_layers": 3}, "vision_config": {"num_hidden_layers": 2}}, "text_decoder",
     "text_config.num_hidden_layers"),
    ({"text_config": {"num_hidden_layers": 3}, "vision_config": {"num_hidden_layers": 2}}, "vision_tower",
     "vision_config.num_hidden_layers"),
    ({"num_hidden_layers": 28, "vision_config": {"depth": 32}}, "text_decoder", "num_hidden_layers"),  # Qwen2-VL
    ({"num_hidden_layers": 28, "vision_config": {"depth": 32}}, "vision_tower", "vision_config.depth"),
    ({"num_hidden_layers": 28}, "multi_modal_projector", None),
])
def test_layer_count_key(config, module, key):
    assert layer_count_key(config, module) == key


def _modules(base: str, a: str, b: str, **extra) -> dict:
    return {"merge_method": "linear", "base_model": base, "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                    {"sources": [{"model": b, "layer_range": [1, 3]}]}]},
        "vision_tower": {"models": [{"model": a}], "parameters": {"weight": 1.0}},
        "multi_modal_projector": {"models": [{"model": b}]}}, **extra}


@pytest.mark.parametrize("change, match", [
    (lambda raw: raw | {"models": [{"model": "x"}]}, "one of 'models', 'slices' or 'modules'"),
    (lambda raw: raw["modules"]["vision_tower"].update(slices=[{"sources": [{"model": "x", "layer_range": [0, 1]}]}]),
     "either a non-empty 'models' or a non-empty 'slices'"),
    (lambda raw: raw["modules"]["vision_tower"].update(models=[]), "either a non-empty 'models'"),
    (lambda raw: raw["modules"]["vision_tower"].update(tensors=1), "tensors"),
])
def test_malformed_modules_are_refused_naming_the_key(change, match):
    raw = _modules("base", "a", "b")
    raw = change(raw) or raw
    with pytest.raises(MergeConfigError, match=match):
        parse_merge_config(raw)


def test_modules_config_round_trips_and_derives_its_models():
    config = parse_merge_config(_modules("base", "a", "b"))
    assert [m.model for m in config.models] == ["a", "b"]
    assert parse_merge_config(__import__("yaml").safe_load(config.to_yaml())) == config


def test_each_module_merges_by_its_own_config_and_the_model_loads(multimodal, tmp_path):
    from transformers import Mistral3ForConditionalGeneration

    m = multimodal
    merge_checkpoints(parse_merge_config(_modules(m["base"], m["a"], m["b"])), tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    a, b = load_file(f"{m['a']}/model.safetensors"), load_file(f"{m['b']}/model.safetensors")
    text = "language_model.model.layers.{}.mlp.up_proj.weight"
    # text decoder: layers 0-1 of a, then layers 1-2 of b, renumbered 0..3; pre weights from the first slice
    assert [torch.equal(out[text.format(i)], src[text.format(j)]) for i, (src, j) in
            enumerate([(a, 0), (a, 1), (b, 1), (b, 2)])] == [True] * 4
    assert torch.equal(out["language_model.model.embed_tokens.weight"], a["language_model.model.embed_tokens.weight"])
    assert torch.equal(out["language_model.model.norm.weight"], b["language_model.model.norm.weight"])
    # vision tower: linear of a and the (appended) base, weight 1 each, normalized -> their mean
    base = load_file(f"{m['base']}/model.safetensors")
    key = "vision_tower.transformer.layers.1.attention.q_proj.weight"
    torch.testing.assert_close(out[key], (a[key] + base[key]) / 2, rtol=0, atol=1e-7)
    key = "multi_modal_projector.linear_1.weight"
    torch.testing.assert_close(out[key], (b[key] + base[key]) / 2, rtol=0, atol=1e-7)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["text_config"]["num_hidden_layers"], config["vision_config"]["num_hidden_layers"]) == (4, 2)
    model = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert len(model.model.language_model.layers) == 4


def test_a_module_missing_from_the_config_is_refused(multimodal, tmp_path):
    raw = _modules(multimodal["base"], multimodal["a"], multimodal["b"])
    del raw["modules"]["multi_modal_projector"]
    with pytest.raises(MergeConfigError, match="'multi_modal_projector', which 'modules' does not list"):
        merge_checkpoints(parse_merge_config(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()
