"""`mergeflow lineage PATH_OR_DIGEST` on a tiny run, for the Prefect store and for the DVC
folders: the weights digest, the params each stage read, the code version, the inputs' digests
and the scores. (Also the other small CLI things of issue 14: `mergeflow methods` and `-v`.)"""

from __future__ import annotations

import json
import logging
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.pipeline_helpers import REPO, write_params


def test_lineage_of_a_prefect_run_and_of_a_dvc_run(prefect_harness, tiny_models, tmp_path, monkeypatch):
    from flows.cli import app
    from flows.lineage import lineage
    from flows.merge_and_eval import merge_and_eval
    from flows.stage import run_named_stage
    from merging import pipeline
    from merging.digests import model_digest
    from merging.errors import ArtifactError
    from merging.pipeline_params import load_params

    monkeypatch.chdir(tmp_path)  # the DVC stages' folders are ./artifacts
    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    raw = yaml.safe_load(params_file.read_text())
    raw["eval"].update({"tasks": ["demo_arith"], "limit": 2, "evaluate_inputs": False})
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)

    run = merge_and_eval(str(params_file))
    saved = Path(run["artifacts"]["save"])
    digest = model_digest(saved)
    result = CliRunner().invoke(app, ["lineage", str(saved), "--params", str(params_file), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["digest"] == digest and info["route"] == "prefect" and info["method"] == "ties"
    assert info["params"]["sparsify"]["parameters"] == {"density": 0.4}  # what each stage read, from its manifest
    assert info["params"]["combine"]["parameters"] == {"density": 0.4, "lambda": 1.0} and info["params"]["save"]["shard_size"] == "2GB"
    assert info["params"]["fetch"]["models"] == params.model_dump(mode="json")["models"]
    assert {name: i["digest"] for name, i in info["inputs"].items()} == {
        name: model_digest(tiny_models[folder]) for name, folder in (("base", "base"), ("a", "ft_a"), ("b", "ft_b"), ("c", "ft_c"))}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert info["code"]["git_commit"] == head and info["code"]["mergeflow"] == version("mergeflow")
    assert [s["scores"] for s in info["scores"]] == [run["accuracy"]["merged"]] and info["scores"][0]["settings"]["limit"] == 2
    assert info["run"]["params"]["merge"]["method"] == "ties"

    for stage in pipeline.STAGES:  # what `dvc repro` runs, stage by stage, into ./artifacts/<stage>
        run_named_stage(stage.name, str(params_file))
    dvc = lineage("artifacts/save", params)
    assert dvc["route"] == "dvc" and dvc["digest"] == digest  # the same params make the same model on both routes
    assert dvc["params"] == info["params"] and dvc["inputs"] == info["inputs"] and dvc["code"]["recorded"] is False
    assert [s["scores"] for s in dvc["scores"]] == [run["accuracy"]["merged"]] * 2  # the two stores' eval caches

    text = CliRunner().invoke(app, ["lineage", digest[:12], "--params", str(params_file)]).output
    assert text.startswith(f"model: {saved}\ndigest: {digest}\n")  # by digest prefix, as YAML
    with pytest.raises(ArtifactError, match="no saved model with this digest"):
        lineage("0123456789abcdef", params)


def test_methods_shows_defaults_bounds_and_descriptions_of_the_parameters_used():
    from flows.cli import app

    out = CliRunner().invoke(app, ["methods", "ties"]).output
    density = next(line for line in out.splitlines() if line.strip().startswith("density (per model)"))
    assert density.split()[3:8] == ["sparsify", "0.2", "0.0", "<", "x"] and "Fraction of each delta kept" in density
    assert "trim_scope" in out and "tensor|model" in out
    assert "accepted, no effect: int8_mask" in out and not any(line.strip().startswith("int8_mask") for line in out.splitlines())
    assert "singular_matrices_drop_rate" not in out  # another method's parameter
    assert CliRunner().invoke(app, ["methods", "tie"]).exit_code == 2  # unknown: one line, the closest name


def test_verbose_is_a_global_option():
    from flows.cli import app

    root = logging.getLogger()
    level = root.level
    try:
        assert CliRunner().invoke(app, ["-v", "methods", "tsv_m"]).exit_code == 0 and root.level == logging.INFO
        assert CliRunner().invoke(app, ["-vv", "methods", "tsv_m"]).exit_code == 0 and root.level == logging.DEBUG
    finally:
        root.setLevel(level)
