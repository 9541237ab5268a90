"""`mergeflow gc` keeps what the current params and the last N runs use, removes the rest."""

from __future__ import annotations

from typer.testing import CliRunner

from tests.pipeline_helpers import write_params


def test_gc_keeps_current_and_recent_artifacts(prefect_harness, tiny_models, tmp_path):
    from flows.cli import app
    from flows.gc import collect_garbage
    from flows.merge_and_eval import merge_and_eval
    from merging.pipeline_params import load_params

    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    fast = {"eval.evaluate_inputs": False}
    old = merge_and_eval(str(params_file), {**fast, "merge.combine": {"lambda": 0.5}})["artifacts"]
    current = merge_and_eval(str(params_file), fast)["artifacts"]
    store = tmp_path / "art" / "store"
    assert len(list(store.glob("combine-*"))) == 2 and len(list((store / "eval-cache").glob("*.json"))) == 3

    params = load_params(params_file, fast)
    assert collect_garbage(params, keep_runs=2, dry_run=True) == []  # both runs are recent
    doomed = collect_garbage(params, keep_runs=0, dry_run=True)
    assert {p.name.split("-")[0] for p in doomed if p.is_dir()} == {"combine", "save", "evaluate", "report"}
    assert all(str(p) in old.values() for p in doomed if p.is_dir())

    result = CliRunner().invoke(app, ["gc", "--params", str(params_file), "--dry-run"])
    assert result.exit_code == 0 and "0 artifact(s) to remove" in result.output, result.output
    removed = collect_garbage(params, keep_runs=0)
    assert removed == doomed and all(not p.exists() for p in removed)
    assert all((tmp_path / "art" / "store").joinpath(p).exists() for p in current.values())
    assert len(list((store / "eval-cache").glob("*.json"))) == 2  # the old merged model's score is gone
    again = merge_and_eval(str(params_file), fast, return_state=True)
    assert again.is_completed() and collect_garbage(params, keep_runs=0) == []
