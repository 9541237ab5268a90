"""The merge-and-eval flow under Prefect: a second run is all Cached; a cached stage whose
artifact vanished is recomputed (and only the stages after it notice)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.pipeline_helpers import write_params


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    states: dict[str, str] = {}
    for run in runs:
        name = run.name.rsplit("-", 1)[0]
        states[name] = states.get(name, "") + ("," if name in states else "") + run.state.name
    return states


def test_second_run_is_cached_and_missing_artifacts_are_recomputed(prefect_harness, tiny_models, tmp_path):
    from flows.merge_and_eval import merge_and_eval

    artifacts = tmp_path / "art"
    params = write_params(tmp_path / "params.yaml", tiny_models, artifacts)
    first = merge_and_eval(str(params), return_state=True)
    assert first.is_completed()
    metrics = first.result()
    assert set(metrics["accuracy"]) == {"merged", "base", "a", "b", "c"} and metrics["method"] == "ties"
    assert set(metrics["normalized_accuracy"]) >= {"demo_arith", "demo_antonym", "mean"}
    # per-item scores (eval.limit 3) behind paired bootstrap intervals of every number
    assert {m: len(v["demo_arith"]) for m, v in metrics["items"].items()} == dict.fromkeys(("merged", "base", "a", "b", "c"), 3)
    assert metrics["items"]["merged"]["demo_arith"].count("1") / 3 == metrics["accuracy"]["merged"]["demo_arith"]
    low, high = metrics["intervals"]["accuracy"]["merged"]["demo_arith"]
    assert low <= metrics["accuracy"]["merged"]["demo_arith"] <= high and metrics["specialists"]["demo_arith"] == "a"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["merge-scores", "merge-vs-specialist", "merge-summary"])))}
    assert keys == {"merge-scores", "merge-vs-specialist", "merge-summary"}  # the score tables and the summary in the UI

    second = merge_and_eval(str(params), return_state=True)
    states = _task_states(second)
    assert set(states) >= {"fetch", "deltas", "decompose", "sparsify", "combine", "save", "evaluate", "report"}
    assert all(set(s.split(",")) == {"Cached"} for s in states.values()), states

    combine_dirs = list((artifacts / "store").glob("combine-*"))
    assert len(combine_dirs) == 1
    shutil.rmtree(combine_dirs[0])
    third = merge_and_eval(str(params), return_state=True)
    states = _task_states(third)
    assert states["combine"] == "Completed" and states["deltas"] == "Cached" and states["sparsify"] == "Cached"
    assert states["save"] == "Cached"  # same merged delta digest -> same model: nothing downstream reruns
    assert combine_dirs[0].is_dir()


def test_changed_lambda_reruns_combine_onward_only(prefect_harness, tiny_models, tmp_path):
    from flows.merge_and_eval import merge_and_eval

    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    merge_and_eval(str(params))
    changed = merge_and_eval(str(params), {"merge.combine": {"lambda": 0.5}}, return_state=True)
    states = _task_states(changed)
    assert states["deltas"] == states["decompose"] == states["sparsify"] == "Cached"
    assert states["combine"] == states["save"] == states["evaluate"] == "Completed"
    results = json.loads(next((tmp_path / "art" / "store").glob("evaluate-*")).joinpath("results.json").read_text())
    assert set(results) == {"merged", "base", "a", "b", "c"}
    cached = list((tmp_path / "art" / "store" / "eval-cache").glob("*.json"))
    assert len(cached) == 6  # base, three inputs and two merged models: the inputs were evaluated once
    report = json.loads((tmp_path / "art" / "report" / "metrics.json").read_text())
    assert report["method"] == "ties"
    assert Path(tmp_path / "art" / "report" / "plots" / "scores.png").stat().st_size > 0


def test_cli_run_with_overrides(prefect_harness, tiny_models, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    result = CliRunner().invoke(app, ["run", "--params", str(params), "--set", "merge.combine.lambda=0.7"])
    assert result.exit_code == 0, result.output
    saved = list((tmp_path / "art" / "store").glob("save-*"))
    assert len(saved) == 1 and json.loads((saved[0] / "manifest.json").read_text())["method"] == "ties"
    combine = json.loads(next((tmp_path / "art" / "store").glob("combine-*")).joinpath("manifest.json").read_text())
    assert combine["params"]["combine"]["parameters"]["lambda"] == 0.7
    bad = CliRunner().invoke(app, ["run", "--params", str(params), "--set", "merge.combine.density=0.1"])
    assert bad.exit_code == 2 and "move it to merge.sparsify" in bad.output


def test_partitioned_stages_give_the_same_model(prefect_harness, tiny_models, tmp_path):
    """decompose/sparsify/combine mapped over 3 tensor-group partitions (task runner) write
    partial artifacts joined by an index; the saved model is byte-identical."""
    from flows.merge_and_eval import merge_and_eval

    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art", method="drm",
                          sparsify={"singular_matrices_drop_rate": 0.6})
    merge_and_eval(str(params), {"pipeline.partitions": 3, "eval.tasks": ["demo_arith"]})
    merge_and_eval(str(params), {"pipeline.partitions": 1, "eval.tasks": ["demo_arith"], "pipeline.artifacts": str(tmp_path / "one")})
    store = tmp_path / "art" / "store"
    assert len(list(store.glob("decompose-part-*"))) == 3 and len(list(store.glob("combine-part-*"))) == 3
    (split,), (whole,) = list(store.glob("save-*")), list((tmp_path / "one" / "store").glob("save-*"))
    assert (split / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    fused = merge_and_eval(str(params), {"pipeline.partitions": 2, "pipeline.materialize": False, "eval.tasks": ["demo_arith"],
                                         "pipeline.artifacts": str(tmp_path / "fused")})
    assert set(fused["artifacts"]) == {"fetch", "collect_stats", "combine", "save", "evaluate", "report"}  # the rest in memory
    assert (Path(fused["artifacts"]["save"]) / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_resharded_model_reuses_its_scores_and_a_changed_tokenizer_does_not(prefect_harness, tiny_models, tmp_path):
    """The merged model's digest covers tensors by name and content plus config and tokenizer
    files: a new shard size rewrites the model but its evaluation is a cache hit; a tokenizer
    change (here: in the base, which the merged model copies) is evaluated anew."""
    from flows.merge_and_eval import merge_and_eval

    base = tmp_path / "base"
    shutil.copytree(tiny_models["base"], base)
    params = write_params(tmp_path / "params.yaml", {**tiny_models, "base": base}, tmp_path / "art")
    merge_and_eval(str(params), {"eval.evaluate_inputs": False})
    cache = tmp_path / "art" / "store" / "eval-cache"
    assert len(list(cache.glob("*.json"))) == 2  # merged and base
    resharded = merge_and_eval(str(params), {"eval.evaluate_inputs": False, "pipeline.shard_size": "8KB"}, return_state=True)
    states = _task_states(resharded)
    assert states["save"] == "Completed" and states["evaluate"] == "Cached" and states["report"] == "Cached"
    assert len(list((tmp_path / "art" / "store").glob("save-*"))) == 2 and len(list(cache.glob("*.json"))) == 2

    config = base / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 77}))
    changed = merge_and_eval(str(params), {"eval.evaluate_inputs": False, "pipeline.shard_size": "8KB"}, return_state=True)
    assert _task_states(changed)["evaluate"] == "Completed"
    saved = sorted((tmp_path / "art" / "store").glob("save-*"), key=lambda p: p.stat().st_mtime_ns)[-1]
    assert json.loads((saved / "tokenizer_config.json").read_text())["model_max_length"] == 77
    assert len(list(cache.glob("*.json"))) == 4  # the merged model and the base, with the new tokenizer


def test_edited_method_source_recomputes_from_the_first_stage_that_runs_it(prefect_harness, tiny_models, tmp_path, monkeypatch):
    """Keys carry a fingerprint of the code each stage runs (read from the source files): after
    an edit of methods/ties.py the next run recomputes sparsify (TIES' trim and election) and
    reuses fetch, deltas and decompose; sparsify's output is byte-identical here (a comment was
    added), so everything after it is reused too."""
    from flows.merge_and_eval import merge_and_eval
    from merging import fingerprint

    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    merge_and_eval(str(params), {"eval.evaluate_inputs": False})
    copy = tmp_path / "src"
    for package in fingerprint.OWN_PACKAGES:  # the same sources elsewhere, one file edited
        shutil.copytree(fingerprint.ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "merging" / "methods" / "ties.py", "a") as f:
        f.write("# an edit\n")
    monkeypatch.setattr(fingerprint, "ROOT", copy)
    fingerprint._path_of.cache_clear()
    try:
        states = _task_states(merge_and_eval(str(params), {"eval.evaluate_inputs": False}, return_state=True))
    finally:
        fingerprint._path_of.cache_clear()
    assert states["fetch"] == states["deltas"] == states["decompose"] == "Cached"
    assert states["sparsify"] == "Completed"
    assert states["combine"] == states["save"] == states["evaluate"] == "Cached"
    assert len(list((tmp_path / "art" / "store").glob("sparsify-*"))) == 2
