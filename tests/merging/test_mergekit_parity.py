"""A mergekit YAML gives the same tensors as mergekit 0.1.5 (within 1e-6 relative) for its
deterministic methods. mergekit runs in-process as the independent oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging import merge_checkpoints, parse_merge_config

mergekit = pytest.importorskip("mergekit")


def _cases(base: str, a: str, b: str, c: str) -> dict[str, dict]:
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.5}},
            {"model": base, "parameters": {"weight": 0.2}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": [0.2, 0.9]}}],
            "parameters": {"lambda": 0.8}},
        "ties": {"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": b, "parameters": {"weight": 0.5, "density": [0.2, 0.8]}},
            {"model": c, "parameters": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.4}], "density": 0.6}}],
            "parameters": {"normalize": True, "lambda": 1.2, "int8_mask": True}},
        "ties_sum": {"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1.0, "density": 0.3}}, {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}],
            "parameters": {"normalize": False}},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1.0, "density": 0.4, "gamma": 0.05}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1.0, "density": 0.4, "gamma": 0.05}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.5, "gamma": 0.02}}]},
        "slerp": {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.3]}, {"value": 0.5}]}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}]},
        "nuslerp_rows_no_base": {"merge_method": "nuslerp", "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}],
            "parameters": {"nuslerp_flatten": False}},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}]},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": base,
                                    "models": [{"model": a}, {"model": b}, {"model": c}], "parameters": {"filter_wise": True}},
        "della_density_one": {"merge_method": "della", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1.0, "density": 1.0}}, {"model": b, "parameters": {"weight": 0.5, "density": 1.0}}]},
        "bf16_out": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1.0}}], "out_dtype": "bfloat16"},
        "passthrough": {"merge_method": "passthrough", "models": [{"model": a}]},
        "passthrough_scaled": {"merge_method": "passthrough", "models": [
            {"model": a, "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.25}]}}]},
        "multislerp": {"merge_method": "multislerp", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.3}},
            {"model": c, "parameters": {"weight": 0.2}}]},
        "multislerp_no_base": {"merge_method": "multislerp", "models": [
            {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 2.0}}],
            "parameters": {"normalize_weights": True, "eps": 1e-6}},
        "karcher": {"merge_method": "karcher", "models": [{"model": a}, {"model": b}, {"model": c}],
                    "parameters": {"max_iter": 20, "tol": 1e-7}},
        "karcher_base_listed": {"merge_method": "karcher", "base_model": base,
                                "models": [{"model": base}, {"model": a}, {"model": b}]},
        # mergekit's base rule: multislerp sets a listed base aside as its reference; linear keeps it an input
        "linear_base_listed": {"merge_method": "linear", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": base, "parameters": {"weight": 0.2}},
            {"model": b, "parameters": {"weight": 0.5}}]},
        # an unlisted base_model is one more input of the methods that take no base, as in mergekit
        "karcher_base_unlisted": {"merge_method": "karcher", "base_model": base, "models": [{"model": a}, {"model": b}]},
        "linear_base_unlisted": {"merge_method": "linear", "base_model": base, "parameters": {"weight": 0.2}, "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.5}}]},
        "multislerp_base_listed": {"merge_method": "multislerp", "base_model": base, "models": [
            {"model": base, "parameters": {"weight": 0.4}}, {"model": a, "parameters": {"weight": 0.5}},
            {"model": b, "parameters": {"weight": 0.3}}]},
        "sce": {"merge_method": "sce", "base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}]},
        "sce_select_topk": {"merge_method": "sce", "base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}],
                            "parameters": {"select_topk": [0.3, 0.7], "int8_mask": True}},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "models": [{"model": a}],
                     "parameters": {"t": [0.005, 0.03]}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": a}]},
        "ram": {"merge_method": "ram", "base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}],
                "parameters": {"epsilon": 0.02}},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}],
                       "parameters": {"epsilon": 0.02, "r": 0.5, "alpha": 0.3}},
    }


@pytest.fixture(scope="module")
def layered_models(tmp_path_factory) -> dict[str, str]:
    from tests.conftest import save_tiny_model, save_tokenizer

    root = tmp_path_factory.mktemp("mk")
    base = save_tiny_model(root / "base", seed=0, layers=3)
    save_tokenizer(base)
    return {"base": str(base), **{n: str(save_tiny_model(root / n, seed=i, base=base)) for i, n in enumerate("abc", 1)}}


@pytest.mark.parametrize("case", list(_cases("b", "a", "b", "c")))
def test_same_tensors_as_mergekit(case, layered_models, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    m = layered_models
    raw = _cases(m["base"], m["a"], m["b"], m["c"])[case]
    run_merge(MergeConfiguration.model_validate(raw), str(tmp_path / "mk"),
              options=MergeOptions(write_model_card=False, quiet=True, copy_tokenizer=False))
    merge_checkpoints(parse_merge_config(raw), tmp_path / "mf")
    expected, got = load_file(Path(tmp_path / "mk" / "model.safetensors")), load_file(tmp_path / "mf" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].dtype == got[key].dtype, key
        e, g = expected[key].double(), got[key].double()
        scale = e.abs().max().clamp(min=1e-12)
        tol = 1e-6 if expected[key].dtype == torch.float32 else 1e-2
        assert ((e - g).abs().max() / scale) <= tol, (key, float((e - g).abs().max() / scale))


def _sliced_cases(base: str, a: str, b: str) -> dict[str, dict]:
    return {
        "frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 3]}]},
            {"sources": [{"model": a, "layer_range": [1, 3]}]}]},
        "frankenmerge_scaled": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [2, 3], "parameters": {"scale": 0.5}}]}]},
        "slerp_sliced": {"merge_method": "slerp", "base_model": a, "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}, {"model": b, "layer_range": [0, 3]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.3]}, {"value": 0.5}]}},
        "slerp_two_slices": {"merge_method": "slerp", "base_model": a, "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]},
            {"sources": [{"model": a, "layer_range": [1, 3]}, {"model": b, "layer_range": [1, 3]}],
             "parameters": {"t": [0.9, 0.1]}}],
            "parameters": {"t": [0.2, 0.6]}},
        "ties_sliced": {"merge_method": "ties", "base_model": base, "slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]},
                         {"model": a, "layer_range": [0, 2], "parameters": {"density": [0.2, 0.8], "weight": 1.0}},
                         {"model": b, "layer_range": [1, 3], "parameters": {"density": 0.5, "weight": 0.4}}]}],
            "parameters": {"normalize": True}},
        # an optional-base method with its base among the sources: the base is the origin, not an input
        "multislerp_base_listed": {"merge_method": "multislerp", "base_model": base, "slices": [
            {"sources": [{"model": base, "layer_range": [0, 3]}, {"model": a, "layer_range": [0, 3], "parameters": {"weight": 0.7}},
                         {"model": b, "layer_range": [0, 3], "parameters": {"weight": 0.3}}]}]},
    }


def assert_same_as_mergekit(raw: dict, out: Path, rtol: float = 1e-6) -> tuple[dict, dict]:
    """Run ``raw`` through mergekit 0.1.5 (in-process) and mergeflow into ``out/mk`` and
    ``out/mf``; every tensor agrees within ``rtol`` of its largest entry. Returns both
    config.json files."""
    import json

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(raw), str(out / "mk"),
              options=MergeOptions(write_model_card=False, quiet=True, copy_tokenizer=False))
    merge_checkpoints(parse_merge_config(raw), out / "mf")
    expected, got = load_file(out / "mk" / "model.safetensors"), load_file(out / "mf" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        e, g = expected[key].double(), got[key].double()
        assert ((e - g).abs().max() / e.abs().max().clamp(min=1e-12)) <= rtol, key
    return tuple(json.loads((out / side / "config.json").read_text()) for side in ("mk", "mf"))


@pytest.mark.parametrize("case", list(_sliced_cases("b", "a", "b")))
def test_slices_same_tensors_and_layer_count_as_mergekit(case, layered_models, tmp_path):
    m = layered_models
    mk, mf = assert_same_as_mergekit(_sliced_cases(m["base"], m["a"], m["b"])[case], tmp_path)
    assert mk["num_hidden_layers"] == mf["num_hidden_layers"]


def _module_cases(base: str, a: str, b: str) -> dict[str, dict]:
    return {
        "ties_per_module": {"merge_method": "ties", "base_model": base, "parameters": {"normalize": True}, "modules": {
            "text_decoder": {"slices": [
                {"sources": [{"model": base, "layer_range": [0, 2]},
                             {"model": a, "layer_range": [0, 2], "parameters": {"density": 0.5, "weight": 1.0}},
                             {"model": b, "layer_range": [1, 3], "parameters": {"density": 0.3, "weight": 0.5}}]},
                {"sources": [{"model": base, "layer_range": [2, 3]},
                             {"model": a, "layer_range": [2, 3], "parameters": {"density": 0.5, "weight": 1.0}}]}]},
            "vision_tower": {"models": [{"model": a, "parameters": {"density": 0.7, "weight": 0.6}},
                                        {"model": b, "parameters": {"density": 0.4, "weight": 0.4}}],
                             "parameters": {"normalize": False}},
            "multi_modal_projector": {"models": [{"model": b, "parameters": {"density": 0.5, "weight": 1.0}}]}}},
        "frankenmerge_and_slerp": {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.3}, "modules": {
            "text_decoder": {"slices": [{"sources": [{"model": a, "layer_range": [0, 3]}, {"model": b, "layer_range": [0, 3]}],
                                         "parameters": {"t": [0.1, 0.9]}},
                                        {"sources": [{"model": a, "layer_range": [1, 2]}, {"model": b, "layer_range": [2, 3]}]}]},
            "vision_tower": {"models": [{"model": a}, {"model": b}]},
            "multi_modal_projector": {"models": [{"model": a}, {"model": b}], "parameters": {"t": 0.8}}}},
    }


@pytest.mark.parametrize("case", list(_module_cases("base", "a", "b")))
def test_modules_same_tensors_and_layer_counts_as_mergekit(case, multimodal, tmp_path):
    m = multimodal
    configs = assert_same_as_mergekit(_module_cases(m["base"], m["a"], m["b"])[case], tmp_path)
    assert [(c["text_config"]["num_hidden_layers"], c["vision_config"]["num_hidden_layers"]) for c in configs] == \
        [(4 if case == "frankenmerge_and_slerp" else 3, 2)] * 2


@pytest.mark.parametrize("tokenizer", [{"source": "union"}, {"source": "base"}, {"source": "union", "pad_to_multiple_of": 8,
                                       "tokens": {"<think>": {"source": "c", "force": True}, "<q>": {"source": {"kind": "zero"}}}}])
def test_added_tokens_same_rows_as_mergekit(tokenizer, tmp_path_factory, tmp_path):
    """Two fine-tunes whose tokenizers add different tokens: every output token's embedding and
    LM-head row equals mergekit's (compared token by token: mergekit's new ids follow a hash order)."""
    import json

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from tokenizers import Tokenizer

    from tests.conftest import save_tiny_model, save_tokenizer
    from tests.merging.test_tokenizer_merge import add_tokens

    root = tmp_path_factory.mktemp("vocab_parity")
    base = save_tiny_model(root / "base", seed=0)
    save_tokenizer(base)
    b = add_tokens(save_tiny_model(root / "b", seed=1, base=base), ["<tool>", "<think>"], 1)
    c = add_tokens(save_tiny_model(root / "c", seed=2, base=base), ["<think>", "<x>"], 2)
    section = json.loads(json.dumps(tokenizer).replace('"c"', json.dumps(str(c))))
    raw = {"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(b), "parameters": {"weight": 0.7, "density": 0.5}}, {"model": str(c), "parameters": {"weight": 0.4, "density": 0.7}}],
        "tokenizer": section}
    run_merge(MergeConfiguration.model_validate(raw), str(tmp_path / "mk"),
              options=MergeOptions(write_model_card=False, quiet=True))
    merge_checkpoints(parse_merge_config(raw), tmp_path / "mf")
    vocabs = {side: Tokenizer.from_file(str(tmp_path / side / "tokenizer.json")).get_vocab() for side in ("mk", "mf")}
    assert vocabs["mk"].keys() == vocabs["mf"].keys()
    expected, got = load_file(tmp_path / "mk" / "model.safetensors"), load_file(tmp_path / "mf" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        e, g = expected[key].double(), got[key].double()
        assert e.shape == g.shape, key
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            order = sorted(vocabs["mk"])
            rows = len(vocabs["mk"])
            e = torch.cat([e[[vocabs["mk"][t] for t in order]], e[rows:]])
            g = torch.cat([g[[vocabs["mf"][t] for t in order]], g[rows:]])
        assert ((e - g).abs().max() / e.abs().max().clamp(min=1e-12)) <= 1e-6, key
    sizes = [json.loads((tmp_path / side / "config.json").read_text())["vocab_size"] for side in ("mk", "mf")]
    assert sizes[0] == sizes[1]
