"""Tensor plan: matrix / other / ignore classification and layer positions."""

import torch

from merging.config import DEFAULT_EXCLUDE
from merging.plan import build_plan

F = torch.float32


def test_default_classification_of_a_llama():
    names = [
        ("model.embed_tokens.weight", (10, 4), F),
        ("model.layers.0.self_attn.q_proj.weight", (4, 4), F),
        ("model.layers.0.input_layernorm.weight", (4,), F),
        ("model.layers.1.mlp.up_proj.weight", (8, 4), F),
        ("lm_head.weight", (10, 4), F),
        ("model.rotary.inv_freq", (2,), torch.int64),
    ]
    plan = {e.name: e for e in build_plan(names, [r".*"], DEFAULT_EXCLUDE, [], num_layers=2)}
    assert plan["model.embed_tokens.weight"].kind == "other"
    assert plan["lm_head.weight"].kind == "other"
    assert plan["model.layers.0.self_attn.q_proj.weight"].kind == "matrix"
    assert plan["model.layers.0.input_layernorm.weight"].kind == "other"
    assert plan["model.rotary.inv_freq"].kind == "ignore"
    assert plan["model.layers.1.mlp.up_proj.weight"].layer_t == 1.0
    assert plan["model.layers.0.self_attn.q_proj.weight"].layer_t == 0.0


def test_drm_semantics_prefix_match_and_ignore():
    names = [("encoder.block.0.weight", (4, 4), F), ("classifier.weight", (2, 4), F), ("x.weight", (4, 4), F)]
    plan = {e.name: e for e in build_plan(names, [".*weight.*"], [".*block.*"], ["classifier.*"])}
    assert plan["encoder.block.0.weight"].kind == "other"
    assert plan["classifier.weight"].kind == "ignore"
    assert plan["x.weight"].kind == "matrix"
