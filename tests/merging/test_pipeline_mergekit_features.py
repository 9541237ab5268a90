"""Slices and the tokenizer section in params.yaml (issue 12 part 7): the staged pipeline
(fetch -> deltas -> ... -> save, as DVC and Prefect run it) writes the same model as
``mergeflow merge`` of the equivalent mergekit config, and a changed slice or tokenizer setting
reruns from the deltas stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from merging import pipeline
from merging.config import parse_merge_config
from merging.digests import model_digest
from merging.errors import MergeConfigError
from merging.pipeline_params import merge_config, parse_params
from tests.merging.test_tokenizer_merge import vocab_models  # noqa: F401  (module-scoped fixture)
from tests.pipeline_helpers import DEMO_EVALS


def _params(models: dict[str, Path], root: Path, method: str, **sections) -> dict:
    return {"models": {"base": {"name": "base", "source": str(models["base"])},
                       "inputs": [{"name": n, "source": str(models[n])} for n in models if n != "base"]},
            "merge": {"method": method, "seed": 0},
            "pipeline": {"device": "cpu", "artifacts": str(root)},
            "eval": {"tasks": ["demo_arith"], "include_path": str(DEMO_EVALS)}, **sections}


def _staged(raw: dict, root: Path) -> Path:
    params = parse_params(raw)
    for name in pipeline.stages_through("save"):
        stage = pipeline.get_stage(name)
        pipeline.run_stage(name, params, {n: root / n for n in pipeline.stage_inputs(stage)}, root / name, root / "store")
    return root / "save"


def test_sliced_frankenmerge_from_params_equals_the_mergekit_config(tiny_models, tmp_path):
    models = {"base": tiny_models["base"], "a": tiny_models["ft_a"], "b": tiny_models["ft_b"]}
    slices = [{"sources": [{"model": "a", "layer_range": [0, 2]}]}, {"sources": [{"model": "b", "layer_range": [1, 2]}]}]
    saved = _staged(_params(models, tmp_path / "p", "passthrough", plan={"slices": slices}), tmp_path / "p")
    mergekit = parse_merge_config({"merge_method": "passthrough", "base_model": str(models["base"]), "base_is_reference": True, "slices": [
        {"sources": [{"model": str(models["a"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(models["b"]), "layer_range": [1, 2]}]}]})
    pipeline.merge_checkpoints(mergekit, tmp_path / "cli")
    assert model_digest(saved) == model_digest(tmp_path / "cli")
    assert '"num_hidden_layers": 3' in (saved / "config.json").read_text()


def test_union_tokenizer_from_params_equals_the_mergekit_config(vocab_models, tmp_path):  # noqa: F811
    models = {"base": vocab_models["base"], "b": vocab_models["b"], "c": vocab_models["c"]}
    tokenizer = {"source": "union", "pad_to_multiple_of": 8, "tokens": {"<new>": {"source": {"kind": "zero"}}},
                 "chat_template": "chatml"}
    raw = _params(models, tmp_path / "p", "linear", tokenizer=tokenizer)
    raw["merge"]["combine"] = {"weight": 0.5}
    saved = _staged(raw, tmp_path / "p")
    mergekit = parse_merge_config({
        "merge_method": "linear", "base_model": str(models["base"]), "base_is_reference": True,
        "models": [{"model": str(models[n]), "parameters": {"weight": 0.5}} for n in "bc"],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {"<new>": {"source": {"kind": "zero"}}}},
        "chat_template": "chatml"})
    pipeline.merge_checkpoints(mergekit, tmp_path / "cli")
    assert model_digest(saved) == model_digest(tmp_path / "cli")


def test_slice_and_tokenizer_settings_rerun_from_deltas():
    deltas = pipeline.get_stage("deltas")
    assert "plan" in deltas.params and "tokenizer" in deltas.params


def test_unknown_model_names_are_named(tiny_models, tmp_path):
    models = {"base": tiny_models["base"], "a": tiny_models["ft_a"]}
    params = parse_params(_params(models, tmp_path, "passthrough",
                                  plan={"slices": [{"sources": [{"model": "zzz", "layer_range": [0, 2]}]}]}))
    with pytest.raises(MergeConfigError, match="'zzz' is not a model name"):
        merge_config(params)
