"""dvc.yaml is generated from the stage table: the committed file is what `mergeflow dvc-yaml`
writes, and every stage lists the code it runs."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.dvc_yaml import render_dvc_yaml
from merging import pipeline

REPO = Path(__file__).resolve().parents[2]


def test_committed_dvc_yaml_is_the_generated_one(monkeypatch):
    monkeypatch.chdir(REPO)
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml("params.yaml"), "run `mergeflow dvc-yaml`"
    result = CliRunner().invoke(app, ["dvc-yaml", "--check"])
    assert result.exit_code == 0, result.output


def test_stages_follow_the_table(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    stages = yaml.safe_load(render_dvc_yaml("params.yaml"))["stages"]
    assert list(stages) == ["base_model", "zoo", *(s.name for s in pipeline.STAGES)]
    for stage in pipeline.STAGES:
        entry = stages[stage.name]
        assert entry["params"] == list(stage.params)
        assert set(pipeline.stage_code_files(stage)) <= set(entry["deps"])
    assert "merging/methods/ties.py" in stages["sparsify"]["deps"]
    assert not any("merging/methods/" in d for d in stages["deltas"]["deps"])  # methods are not deltas' code
    assert "artifacts/save/model.digest" in stages["evaluate"]["deps"]  # not the shard files
    assert "artifacts/save" not in stages["evaluate"]["deps"]
    stale = tmp_path / "dvc.yaml"
    stale.write_text("stages: {}\n")
    assert CliRunner().invoke(app, ["dvc-yaml", "--check", "--out", str(stale)]).exit_code == 1


def test_statistics_files_named_in_the_params_are_deps_of_the_merge(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["merge"] = {"method": "regmean", "combine": {"stats": {"antonym": "./stats/antonym.safetensors",
                                                               "category": "./stats/category.safetensors"}}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    deltas = yaml.safe_load(render_dvc_yaml(str(params)))["stages"]["deltas"]
    assert {"./stats/antonym.safetensors", "./stats/category.safetensors"} <= set(deltas["deps"])


def test_collect_stats_reads_the_merge_settings_only_for_statistics_of_the_whole_recipe(tmp_path):
    """RegMean++'s Grams depend on the merge settings, so DVC must rerun collect_stats when they
    change; RegMean's are per model and data, so a changed alpha must not recollect them."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    found = {}
    for method in ("regmean", "regmean_plusplus"):
        raw["merge"] = {"method": method, "combine": {"alpha": 0.5}}
        params = tmp_path / f"{method}.yaml"
        params.write_text(yaml.safe_dump(raw))
        found[method] = yaml.safe_load(render_dvc_yaml(str(params)))["stages"]["collect_stats"]["params"]
    assert "merge.combine" not in found["regmean"]
    assert found["regmean_plusplus"] == [*found["regmean"], "merge.combine"]
