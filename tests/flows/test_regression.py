"""Each run sees what changed, and regressions are flagged: a run of a series whose merged model
scores lower than the previous run's by more than eval.regression_tolerance ends Failed, with a
markdown artifact naming the task, both recipes and the diff of their params; hub inputs on a
branch are pinned to the commit the branch points at when the run starts."""

from __future__ import annotations

import json
from pathlib import Path

from tests.pipeline_helpers import write_params

LEAN = {"eval.tasks": ["demo_arith"], "eval.evaluate_inputs": False}


def _share_of_tensors_moved(folder: str, settings: dict, base_folder: str | None = None) -> dict:
    """Stands in for lm-eval, whose scores on tiny random models are all chance: the share of the
    model's tensors that differ from the base's (a merge with lambda 1 moves them all, lambda 0 none)."""
    from safetensors.torch import load_file

    def tensors(path: str) -> dict:
        return {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(f).items()}

    model, base = tensors(folder), tensors(base_folder)
    score = sum(not model[k].equal(base[k]) for k in base) / len(base)
    return {"results": {task: {"acc,none": score} for task in settings["tasks"]}, "n_samples": {}}


def _regression_artifact() -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["merge-regression"])))
    return found[-1].data if found else None


def test_a_score_drop_beyond_the_tolerance_fails_the_run(prefect_harness, tiny_models, tmp_path, monkeypatch):
    from evaluation import harness
    from flows.merge_and_eval import merge_and_eval

    monkeypatch.setattr(harness, "run_lm_eval", _share_of_tensors_moved)
    params = str(write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art"))
    good, worse = {**LEAN, "merge.combine.lambda": 1.0}, {**LEAN, "merge.combine.lambda": 0.0}

    first = merge_and_eval(params, good, series="nightly", return_state=True)
    assert first.is_completed() and first.result()["accuracy"]["merged"] == {"demo_arith": 1.0}
    second = merge_and_eval(params, worse, series="nightly", return_state=True)
    assert second.is_failed() and "regression in series 'nightly'" in second.message and "demo_arith 1.0000 -> 0.0000" in second.message
    report = _regression_artifact()
    assert report is not None and "| demo_arith | 1.0000 | 0.0000 | -1.0000 |" in report
    assert "| `params.merge.combine.lambda` | `1.0` | `0.0` |" in report  # the diff of the two recipes' params
    assert report.count("## Recipe:") == 2 and '"lambda": 1.0' in report and '"lambda": 0.0' in report

    records = [json.loads(line) for line in (tmp_path / "art" / "store" / "runs.jsonl").read_text().splitlines()]
    assert [(r["series"], r["scores"]) for r in records] == [("nightly", {"demo_arith": 1.0}), ("nightly", {"demo_arith": 0.0})]
    assert set(records[0]["inputs"]) == {"base", "a", "b", "c"} and all(i["digest"] for i in records[0]["inputs"].values())

    # within the tolerance, and runs of no series (sweeps, `mergeflow run`), are not flagged
    assert merge_and_eval(params, good, series="lenient", return_state=True).is_completed()
    assert merge_and_eval(params, {**worse, "eval.regression_tolerance": 1.0}, series="lenient", return_state=True).is_completed()
    assert merge_and_eval(params, good, return_state=True).is_completed()
    assert merge_and_eval(params, worse, return_state=True).is_completed()

    from typer.testing import CliRunner

    from flows.cli import app

    lean = ["--params", params, "--series", "cli", "--set", "eval.tasks=[demo_arith]", "--set", "eval.evaluate_inputs=false"]
    assert CliRunner().invoke(app, ["run", *lean, "--set", "merge.combine.lambda=1.0"]).exit_code == 0
    flagged = CliRunner().invoke(app, ["run", *lean, "--set", "merge.combine.lambda=0.0"])
    assert flagged.exit_code == 1 and "regression in series 'cli'" in flagged.output  # mergeflow run: exit code 1


def test_hub_inputs_on_a_branch_are_pinned_to_their_current_commit(prefect_harness, tiny_models, tmp_path, monkeypatch):
    """A hub model given by branch resolves to the commit the branch points at (here from a local hub
    cache, offline): the same commit gives the same fetch key (an unchanged input is a cache hit),
    a new upload gives its new commit and a new key. Local inputs are left as they are."""
    import shutil

    import huggingface_hub.constants

    from flows.merge_and_eval import pin_inputs
    from merging import pipeline
    from merging.pipeline_params import load_params

    cache = tmp_path / "hub"
    repo = cache / "models--mergeflow-tests--tiny-ft"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def upload(commit: str, source: Path) -> None:
        shutil.copytree(source, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    first, second = "1" * 40, "2" * 40
    upload(first, tiny_models["ft_a"])
    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    raw = load_params(params_file).model_dump(mode="json")
    hub = {"models.inputs": [{**raw["models"]["inputs"][0], "source": "mergeflow-tests/tiny-ft", "revision": "main"},
                             *raw["models"]["inputs"][1:]]}
    pinned = pin_inputs(load_params(params_file, hub))
    assert pinned.models.inputs[0].revision == first
    assert [m.revision for m in pinned.models.inputs[1:]] == [None, None] and pinned.models.base.revision is None
    key = pipeline.stage_key("fetch", pinned, {})
    assert pipeline.stage_key("fetch", pin_inputs(load_params(params_file, hub)), {}) == key  # unchanged: cache hit

    upload(second, tiny_models["ft_b"])  # a new upload on main
    moved = pin_inputs(load_params(params_file, hub))
    assert moved.models.inputs[0].revision == second and pipeline.stage_key("fetch", moved, {}) != key
    assert pin_inputs(moved) == moved  # a commit is already pinned: nothing to resolve


def test_gc_keeps_the_last_runs_of_each_series(tiny_models, tmp_path):
    """pipeline.keep_runs is the retention: old nightly artifacts go, the last N runs of every
    series (and of runs without one) keep theirs."""
    from flows.gc import collect_garbage
    from merging.pipeline_params import load_params

    params = load_params(write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art"), {"pipeline.keep_runs": 2})
    store = tmp_path / "art" / "store"
    runs = [("nightly", "save-n1"), ("nightly", "save-n2"), ("manual", "save-m1"), ("nightly", "save-n3"), (None, "save-x1")]
    store.mkdir(parents=True)
    with open(store / "runs.jsonl", "w") as log:
        for series, folder in runs:
            (store / folder).mkdir()
            log.write(json.dumps({"series": series, "artifacts": {"save": str(store / folder)}}) + "\n")
    assert [p.name for p in collect_garbage(params, dry_run=True)] == ["save-n1"]
    assert [p.name for p in collect_garbage(params, keep_runs=1)] == ["save-n1", "save-n2"]
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == ["save-m1", "save-n3", "save-x1"]
