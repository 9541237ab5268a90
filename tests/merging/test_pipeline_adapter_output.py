"""``pipeline.out_format: peft`` in params.yaml: the save stage writes the merge of LoRA adapters as
a PEFT adapter artifact, staged and fused runs write the bytes ``mergeflow merge --out-format
peft`` writes, the evaluate stage scores it through peft on the base, and the keys follow what
each stage reads (out_format from deltas on, adapter_rank in save only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from merging import pipeline
from merging.errors import MergeConfigError
from merging.io.artifacts import read_manifest
from merging.pipeline import merge_checkpoints
from merging.pipeline_params import load_params, merge_config
from tests.pipeline_helpers import MERGE_STAGES, run_merge_stages, write_params

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA adapters of the tiny base (ranks 2, 3, 2; one rsLoRA), random factors."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("pipeline-adapters")
    out = {"base": tiny_models["base"]}
    settings = {"ft_a": dict(r=2, lora_alpha=4), "ft_b": dict(r=3, lora_alpha=3, use_rslora=True),
                "ft_c": dict(r=2, lora_alpha=2)}
    for seed, (name, kwargs) in enumerate(settings.items(), start=1):
        model = LlamaForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **kwargs))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.copy_(0.2 * torch.randn(param.shape, generator=g))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _params(adapters, tmp_path: Path, method: str, name: str = "params.yaml", **pipeline_keys) -> Path:
    sections = {"drm": {"decompose": {"direction": "horizontal"}, "sparsify": {"singular_matrices_drop_rate": 0.5},
                        "combine": {"lambda": 1.2}},
                "task_arithmetic": {"combine": {"lambda": 0.8}},
                "ties": {"sparsify": {"density": 0.5}, "combine": {"lambda": 1.0}}}[method]
    path = write_params(tmp_path / name, adapters, tmp_path / "art", method=method, **sections)
    raw = yaml.safe_load(path.read_text())
    raw["pipeline"].update({"out_format": "peft", **pipeline_keys})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("method", ["drm", "task_arithmetic"])
def test_staged_fused_and_merge_command_write_the_same_adapter(adapters, tmp_path, method):
    params_file = _params(adapters, tmp_path, method)
    staged = run_merge_stages(params_file, tmp_path / "staged")
    fused = run_merge_stages(params_file, tmp_path / "fused", materialize=False)
    config = merge_config(load_params(params_file))
    assert config.out_format == "peft"
    reference = merge_checkpoints(config, tmp_path / "cli")
    for name in ADAPTER_FILES:
        assert (staged / name).read_bytes() == (reference / name).read_bytes(), name
        assert (fused / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (staged / "model.safetensors").exists()
    manifest = read_manifest(staged)
    assert (staged / pipeline.MODEL_DIGEST_FILE).read_text().strip() == manifest["output_digest"]
    assert "adapter_model.safetensors" in manifest["files"]
    cfg = json.loads((staged / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]} == {"q_proj", "v_proj", "down_proj"}


def test_the_adapter_artifact_is_the_merge_peft_loads(adapters, tmp_path):
    """The staged artifact loaded by peft on the base equals the staged hf model's weights."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    adapter = run_merge_stages(_params(adapters, tmp_path, "drm"), tmp_path / "peft")
    hf = run_merge_stages(_params(adapters, tmp_path, "drm", name="hf.yaml", out_format="hf"), tmp_path / "hf")
    want = load_file(hf / "model.safetensors")
    base = LlamaForCausalLM.from_pretrained(adapters["base"], dtype=torch.float32)
    got = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    for key, weight in want.items():
        assert torch.allclose(got[key], weight, rtol=0, atol=1e-6), key


def test_out_format_keys_from_deltas_and_adapter_rank_keys_save_only(adapters, tmp_path):
    root = tmp_path / "one"
    run_merge_stages(_params(adapters, tmp_path, "task_arithmetic"), root)
    before = load_params(_params(adapters, tmp_path, "task_arithmetic"))

    def keys(params):
        return {n: pipeline.stage_key(n, params, {i: root / i for i in pipeline.stage_inputs(pipeline.get_stage(n))})
                for n in MERGE_STAGES}

    base = keys(before)
    ranked = keys(load_params(_params(adapters, tmp_path, "task_arithmetic", name="r.yaml", adapter_rank=2)))
    assert [n for n in MERGE_STAGES if ranked[n] != base[n]] == ["save"]
    hf = keys(load_params(_params(adapters, tmp_path, "task_arithmetic", name="h.yaml", out_format="hf")))
    assert [n for n in MERGE_STAGES if hf[n] != base[n]] == ["deltas", "save"]  # later stages: by deltas' digest


def test_a_full_rank_method_needs_adapter_rank_and_leaves_nothing(adapters, tmp_path):
    params_file = _params(adapters, tmp_path, "ties")
    with pytest.raises(MergeConfigError, match="adapter_rank"):
        run_merge_stages(params_file, tmp_path / "r")
    assert not (tmp_path / "r" / "save").exists()
    ranked = run_merge_stages(_params(adapters, tmp_path, "ties", name="k.yaml", adapter_rank=2), tmp_path / "k")
    report = json.loads((ranked / "adapter_report.json").read_text())
    assert report and all(m["rank"] <= 2 for m in report["modules"].values())


def test_the_evaluate_stage_scores_the_adapter_through_peft(adapters, tmp_path, monkeypatch):
    """The evaluate stage hands lm-eval the adapter artifact on the fetched base."""
    from evaluation import harness

    params_file = _params(adapters, tmp_path, "task_arithmetic")
    root = tmp_path / "e"
    run_merge_stages(params_file, root)
    seen = {}

    def fake_run(folder, settings, base_folder=None):
        seen[Path(folder).name] = harness._model_args(folder, settings, base_folder)
        return {"results": {}, "n-samples": {}, "item_scores": {}}

    monkeypatch.setattr(harness, "run_lm_eval", fake_run)
    monkeypatch.setattr(harness, "primary_scores", lambda result: {})
    params = load_params(params_file)
    harness.evaluate_models(params, {"fetch": root / "fetch", "save": root / "save"}, tmp_path, tmp_path / "store", "c")
    merged = seen["save"]
    assert merged["peft"] == str(root / "save") and Path(merged["pretrained"]).resolve() == adapters["base"].resolve()
