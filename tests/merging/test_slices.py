"""Layer slices: the tensor mapping of a sliced config, the merged output, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merging import merge_checkpoints, parse_merge_config
from merging.errors import CheckpointMismatchError, MergeConfigError
from merging.slices import expand_slices, sliced_layer_count


def _shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,), "lm_head.weight": (8, 4)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.mlp.up_proj.weight": (6, 4), f"model.layers.{i}.input_layernorm.weight": (4,)}
    return shapes


def _frankenmerge(**extra) -> dict:
    return {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "A", "layer_range": [0, 2]}]},
        {"sources": [{"model": "B", "layer_range": [1, 3]}]},
        {"sources": [{"model": "A", "layer_range": [2, 4]}]}], **extra}


def test_frankenmerge_maps_each_output_layer_to_its_source_layer():
    config = parse_merge_config(_frankenmerge())
    assert [m.model for m in config.models] == ["A", "B"] and sliced_layer_count(config.slices) == 6
    mapped = expand_slices(config, "A", False, lambda ref: _shapes(4), lambda ref: 4)
    by_name = {m.name: m for m in mapped}
    assert [m.name for m in mapped][0] == "model.embed_tokens.weight"
    assert [m.name for m in mapped][-2:] == ["model.norm.weight", "lm_head.weight"]
    sources = {j: by_name[f"model.layers.{j}.mlp.up_proj.weight"].reference for j in range(6)}
    assert sources == {0: ("A", "model.layers.0.mlp.up_proj.weight"), 1: ("A", "model.layers.1.mlp.up_proj.weight"),
                       2: ("B", "model.layers.1.mlp.up_proj.weight"), 3: ("B", "model.layers.2.mlp.up_proj.weight"),
                       4: ("A", "model.layers.2.mlp.up_proj.weight"), 5: ("A", "model.layers.3.mlp.up_proj.weight")}
    # passthrough has no base: each slice's one source is both reference and input
    assert by_name["model.layers.2.mlp.up_proj.weight"].inputs == (("B", "model.layers.1.mlp.up_proj.weight"),)
    assert "model.layers.6.mlp.up_proj.weight" not in by_name


def test_gradients_run_per_slice_and_base_is_the_reference():
    config = parse_merge_config({"merge_method": "slerp", "base_model": "A", "slices": [
        {"sources": [{"model": "A", "layer_range": [0, 3]}, {"model": "B", "layer_range": [1, 4]}]},
        {"sources": [{"model": "B", "layer_range": [3, 4]}, {"model": "A", "layer_range": [0, 1]}],
         "parameters": {"t": 0.9}}]})
    mapped = {m.name: m for m in expand_slices(config, "A", True, lambda ref: _shapes(4), lambda ref: 4)}
    ts = [mapped[f"model.layers.{j}.input_layernorm.weight"].layer_t for j in range(4)]
    assert ts == [0.0, 0.5, 1.0, 1.0]  # slice of 3 layers, then a one-layer slice (t = 1, as mergekit)
    last = mapped["model.layers.3.input_layernorm.weight"]
    assert last.reference == ("A", "model.layers.0.input_layernorm.weight")
    assert last.inputs == (("B", "model.layers.3.input_layernorm.weight"),) and last.group.parameters == {"t": 0.9}
    assert mapped["model.embed_tokens.weight"].layer_t == 0.0


@pytest.mark.parametrize(("raw", "error", "match"), [
    (_frankenmerge(models=["A"]), MergeConfigError, "one of 'models', 'slices' or 'modules', not models and slices"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "A", "layer_range": [0, 2]},
                                                        {"model": "B", "layer_range": [0, 3]}]}]},
     MergeConfigError, "same number of layers"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "A", "layer_range": [2, 2]}]}]},
     MergeConfigError, "layer_range"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "A", "layer_range": [0, 2], "weight": 1}]}]},
     MergeConfigError, "weight"),
])
def test_malformed_slices_are_refused_naming_the_key(raw, error, match):
    with pytest.raises(error, match=match):
        parse_merge_config(raw)


def test_mapping_refusals():
    outside = parse_merge_config({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "A", "layer_range": [2, 6]}]}]})
    with pytest.raises(MergeConfigError, match=r"slices\[0\].sources\[0\].layer_range \[2, 6\] is outside model 'A'"):
        expand_slices(outside, "A", False, lambda ref: _shapes(4), lambda ref: 4)
    no_base = parse_merge_config({"merge_method": "ties", "base_model": "C", "slices": [
        {"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 2]}]}]})
    with pytest.raises(MergeConfigError, match=r"slices\[0\]: method 'ties' needs its base model 'C'"):
        expand_slices(no_base, "C", True, lambda ref: _shapes(4), lambda ref: 4)
    wide = parse_merge_config({"merge_method": "linear", "slices": [
        {"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 2]}]}]})
    other = {**_shapes(4), "model.layers.1.mlp.up_proj.weight": (7, 4)}
    with pytest.raises(CheckpointMismatchError, match="model 'B' has shape"):
        expand_slices(wide, "A", False, lambda ref: other if ref == "B" else _shapes(4), lambda ref: 4)


def test_config_round_trips_through_yaml():
    import yaml

    config = parse_merge_config(_frankenmerge(parameters={"scale": 1.0}))
    again = parse_merge_config(yaml.safe_load(config.to_yaml()))
    assert again == config and "models" not in yaml.safe_load(config.to_yaml())


def test_stacked_model_loads_with_its_new_layer_count(tiny_models, tmp_path):
    from transformers import LlamaForCausalLM

    a, b = str(tiny_models["ft_a"]), str(tiny_models["ft_b"])
    raw = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": [{"model": b, "layer_range": [1, 2]}]}],
        "out_dtype": "bfloat16"}
    out = merge_checkpoints(parse_merge_config(raw), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    got, src_b = load_file(out / "model.safetensors"), load_file(tiny_models["ft_b"] / "model.safetensors")
    assert torch.equal(got["model.layers.2.self_attn.q_proj.weight"],
                       src_b["model.layers.1.self_attn.q_proj.weight"].to(torch.bfloat16))
    model = LlamaForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 3


def test_slices_refuse_adapter_output():
    from merging.context import MergeContext

    with pytest.raises(MergeConfigError, match="out_format: peft is not available with slices"):
        MergeContext(parse_merge_config(_frankenmerge(out_format="peft")))
