"""The stage table and its one runner, on temporary folders: artifacts and manifests, keys that
change only downstream of a changed parameter or of edited code, passthrough, and the same
model from ``mergeflow merge``, the staged pipeline and the fused pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from merging import fingerprint, pipeline
from merging.errors import ArtifactError
from merging.io.artifacts import ArtifactReader, linked_data_folder, read_manifest
from merging.pipeline_params import load_params
from tests.pipeline_helpers import MERGE_STAGES, run_merge_stages, write_params


def test_artifacts_and_manifests(tiny_models, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    model = run_merge_stages(params_file, tmp_path / "a")
    manifest = read_manifest(tmp_path / "a" / "sparsify")
    assert manifest["stage"] == "sparsify" and manifest["params"]["sparsify"]["parameters"] == {"density": 0.4}
    assert manifest["params"]["sparsify"]["models"][0] == {}  # the weight is read by combine, not sparsify
    assert set(manifest["inputs"]) == {"collect_stats", "decompose", "deltas", "fetch"} and manifest["versions"]["torch"]
    assert read_manifest(tmp_path / "a" / "decompose")["passthrough"]  # ties has no decomposition
    # deltas is a recipe (no tensors stored: its readers compute input - base); ties' decompose a passthrough of it
    assert read_manifest(tmp_path / "a" / "deltas")["recipe"] and not list((tmp_path / "a" / "deltas").glob("*.safetensors"))
    assert linked_data_folder(tmp_path / "a" / "decompose") == (tmp_path / "a" / "deltas").resolve()
    with pytest.raises(ArtifactError, match="recipe"):
        ArtifactReader(tmp_path / "a" / "decompose")
    assert ArtifactReader(tmp_path / "a" / "sparsify").read_group("model.layers.0.self_attn.q_proj.weight")["deltas"].shape[0] == 3
    assert (model / "config.json").is_file()
    assert (model / pipeline.MODEL_DIGEST_FILE).read_text().strip() == read_manifest(model)["output_digest"]
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # links between artifacts are relative
    shutil.rmtree(tmp_path / "a" / "deltas")
    assert linked_data_folder(tmp_path / "moved" / "decompose") == (tmp_path / "moved" / "deltas").resolve()
    models = json.loads((tmp_path / "a" / "fetch" / "models.json").read_text())
    assert Path(models["a"]["folder"]).resolve() == tiny_models["ft_a"].resolve() and len(models["a"]["digest"]) == 64


def test_changed_param_changes_only_downstream_keys(tiny_models, tmp_path):
    root = tmp_path / "one"
    run_merge_stages(write_params(tmp_path / "p1.yaml", tiny_models, tmp_path / "art"), root)
    p1 = load_params(tmp_path / "p1.yaml")
    p2 = load_params(write_params(tmp_path / "p2.yaml", tiny_models, tmp_path / "art", sparsify={"density": 0.6}))

    def key(name, params):
        return pipeline.stage_key(name, params, {n: root / n for n in pipeline.stage_inputs(pipeline.get_stage(name))})

    for name in ("fetch", "collect_stats", "deltas", "decompose"):
        assert key(name, p1) == key(name, p2)
    assert key("sparsify", p1) != key("sparsify", p2) and key("combine", p1) != key("combine", p2)


def test_a_statistics_file_rewritten_in_place_changes_the_merge_keys(tiny_models, tmp_path):
    """RegMean's per-model Grams are named by path in params.yaml; their state joins the key."""
    import torch
    from safetensors.torch import load_file

    from merging.io.stats import write_stats

    base = load_file(tiny_models["base"] / "model.safetensors")
    grams = {}
    for i, name in enumerate("abc"):
        xs = {k: torch.randn(32, t.shape[1], generator=torch.Generator().manual_seed(i)) for k, t in base.items()
              if t.dim() == 2 and "embed" not in k and "lm_head" not in k}
        grams[name] = write_stats(tmp_path / f"{name}.safetensors", {k: x.T @ x / 32 for k, x in xs.items()}, "gram",
                                  tokens={k: 32 for k in xs})
    params_file = write_params(tmp_path / "p.yaml", tiny_models, tmp_path / "art", method="regmean",
                               combine={"stats": {n: str(f) for n, f in grams.items()}})
    params = load_params(params_file)
    root = tmp_path / "run"
    run_merge_stages(params_file, root)

    def key(name):
        return pipeline.stage_key(name, params, {n: root / n for n in pipeline.stage_inputs(pipeline.get_stage(name))})

    before = {name: key(name) for name in MERGE_STAGES[2:]}
    stats = load_file(grams["b"])
    write_stats(grams["b"], {k: v * 2 for k, v in stats.items()}, "gram", tokens={k: 32 for k in stats})
    assert all(key(name) != before[name] for name in before)


def test_rerun_with_the_same_key_writes_nothing(tiny_models, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    run_merge_stages(params_file, tmp_path / "a")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("manifest.json")}
    run_merge_stages(params_file, tmp_path / "a")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("manifest.json")} == before


def test_edited_method_source_changes_keys_from_the_first_stage_that_runs_it(tiny_models, tmp_path, monkeypatch):
    """Keys carry the fingerprint of the code each stage runs: a comment added to ties.py changes
    the key of sparsify (TIES' trim and election), never fetch, collect_stats, deltas or decompose (identity for
    TIES). Later stages key on sparsify's output digest, so they rerun only if its output changes."""
    root = tmp_path / "one"
    params = load_params(write_params(tmp_path / "p.yaml", tiny_models, tmp_path / "art"))
    run_merge_stages(tmp_path / "p.yaml", root)

    def keys():
        return {n: pipeline.stage_key(n, params, {i: root / i for i in pipeline.stage_inputs(pipeline.get_stage(n))})
                for n in MERGE_STAGES}

    before = keys()
    copy = tmp_path / "src"
    for package in ("merging", "evaluation"):  # (collect_stats runs evaluation code)
        shutil.copytree(fingerprint.ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "ROOT", copy)
    fingerprint._path_of.cache_clear()
    try:
        assert keys() == before  # the same files elsewhere: the same keys
        with open(copy / "merging" / "methods" / "ties.py", "a") as f:
            f.write("# an edit\n")
        after = keys()
    finally:
        fingerprint._path_of.cache_clear()
    assert [n for n in MERGE_STAGES if after[n] != before[n]] == ["sparsify"]


def test_fused_equals_materialized_bit_for_bit(tiny_models, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art", method="dare_ties",
                               sparsify={"density": 0.5}, combine={"lambda": 0.8})
    a = run_merge_stages(params_file, tmp_path / "m")
    b = run_merge_stages(params_file, tmp_path / "f", materialize=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert read_manifest(a)["output_digest"] == read_manifest(b)["output_digest"]
    assert read_manifest(tmp_path / "f" / "sparsify")["fused"] and not (tmp_path / "f" / "deltas" / "model.safetensors").exists()


MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.mark.parametrize("method,merge", [
    ("ties", {"sparsify": {"density": 0.4}, "combine": {"lambda": 0.9}}),
    ("dare_ties", {"sparsify": {"density": 0.5}, "combine": {"lambda": 0.8}}),
])
def test_merge_command_and_pipeline_give_the_same_model(tiny_models, tmp_path, method, merge):
    """``mergeflow merge CONFIG``, the staged pipeline and the fused pipeline write the same
    weights (several shards and the index), config and tokenizer files; only the card differs."""
    from typer.testing import CliRunner

    from flows.cli import app

    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art", method=method, **merge)
    raw = yaml.safe_load(params_file.read_text())
    raw["pipeline"]["shard_size"] = "8KB"
    params_file.write_text(yaml.safe_dump(raw))
    staged = run_merge_stages(params_file, tmp_path / "staged")
    fused = run_merge_stages(params_file, tmp_path / "fused", materialize=False)
    config = {"merge_method": method, "base_model": str(tiny_models["base"]), "seed": 0, "device": "cpu",
              "models": [{"model": str(tiny_models[n])} for n in ("ft_a", "ft_b", "ft_c")],
              "parameters": {**merge["sparsify"], **merge["combine"]}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "cli"), "--shard-size", "8KB", "-q"])
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in (tmp_path / "cli").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "cli" / "model.safetensors.index.json").is_file()
    for name in [*shards, "model.safetensors.index.json", *MODEL_FILES]:
        reference = (tmp_path / "cli" / name).read_bytes()
        assert (staged / name).read_bytes() == reference, name
        assert (fused / name).read_bytes() == reference, name


def test_missing_input_artifact_is_a_clear_error(tiny_models, tmp_path):
    params = load_params(write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art"))
    pipeline.run_stage("fetch", params, {}, tmp_path / "fetch", tmp_path / "store")
    pipeline.run_stage("collect_stats", params, {"fetch": tmp_path / "fetch"}, tmp_path / "collect_stats", tmp_path / "store")
    upstream = {"fetch": tmp_path / "fetch", "collect_stats": tmp_path / "collect_stats"}
    with pytest.raises(ArtifactError, match="missing or incomplete"):
        pipeline.run_stage("decompose", params, {**upstream, "deltas": tmp_path / "nowhere"},
                           tmp_path / "decompose", tmp_path / "store")
    assert not (tmp_path / "decompose").exists()
    with pytest.raises(ArtifactError, match=r"needs the artifact\(s\) \['deltas'\]"):
        pipeline.run_stage("decompose", params, upstream, tmp_path / "decompose", tmp_path / "store")


def test_every_stage_function_resolves():
    for stage in pipeline.STAGES:
        assert (stage.group is not None) != (stage.artifact is not None), stage.name
        if stage.artifact:
            assert callable(stage.artifact_function())
        assert set(stage.inputs) <= {s.name for s in pipeline.STAGES[: pipeline.STAGES.index(stage)]}


def write_size(params, inputs, folder, store, code) -> list[str]:
    """A stage added by a test: the saved model's weight bytes."""
    size = sum(p.stat().st_size for p in inputs["save"].glob("*.safetensors"))
    (folder / "size.json").write_text(json.dumps({"bytes": size}))
    return ["size.json"]


def test_a_new_stage_is_one_entry_and_one_function(tiny_models, tmp_path, monkeypatch):
    from flows.dvc_yaml import render_dvc_yaml
    from flows.merge_and_eval import walk

    size = pipeline.Stage("size", ("save",), ("pipeline.out_dtype",), artifact=f"{__name__}:write_size")
    after_save = [s.name for s in pipeline.STAGES].index("save") + 1
    stages = (*pipeline.STAGES[:after_save], size, *pipeline.STAGES[after_save:])
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "_BY_NAME", {s.name: s for s in stages})
    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    root = run_merge_stages(params_file, tmp_path / "a").parent
    params = load_params(params_file)
    out = pipeline.run_stage("size", params, {"save": root / "save"}, root / "size", root / "store")
    assert json.loads((out / "size.json").read_text())["bytes"] > 0 and read_manifest(out)["stage"] == "size"
    assert pipeline.stage_key("size", params, {"save": root / "save"}) == read_manifest(out)["cache_key"]
    dvc = yaml.safe_load(render_dvc_yaml(str(params_file)))["stages"]["size"]
    assert dvc["deps"][0] == "artifacts/save/model.digest" and dvc["outs"] == ["artifacts/size"]
    visited = walk(params, lambda stage, inputs: root / stage.name if stage.name != "evaluate" else None)
    assert list(visited) == ["fetch", "collect_stats", "deltas", "decompose", "sparsify", "combine", "save", "size"]
