"""The sweep flow: grid points as subflows over shared artifacts, selection on validation
tasks, winners reported on test tasks, a leaderboard."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from flows.sweep import expand_grid, label
from tests.pipeline_helpers import write_params


def test_expand_grid():
    points = expand_grid([{"method": "ties", "sparsify": {"density": [0.2, 0.4]}, "combine": {"lambda": [0.5, 1.0]}},
                          {"method": "task_arithmetic", "combine": {"lambda": 0.3}}])
    assert len(points) == 5
    assert points[0] == {"merge.method": "ties", "name": "ties", "merge.decompose!": {}, "merge.sparsify!": {"density": 0.2},
                         "merge.combine!": {"lambda": 0.5}}
    assert label(points[-1]) == "task_arithmetic lambda=0.3"


def test_sweep_selects_on_validation_and_reuses_upstream(prefect_harness, tiny_models, tmp_path):
    from flows.sweep import format_leaderboard, sweep

    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    raw = yaml.safe_load(params.read_text())
    raw["eval"]["validation_tasks"] = ["demo_arith_val", "demo_antonym_val"]
    params.write_text(yaml.safe_dump(raw))
    grid = tmp_path / "sweep.yaml"
    grid.write_text(yaml.safe_dump({"grid": [{"method": "ties", "sparsify": {"density": [0.3, 0.6]}},
                                              {"method": "task_arithmetic", "combine": {"lambda": [0.5]}}],
                                    "select": "normalized_accuracy", "prune": True}))
    rows = sweep(str(grid), str(params))
    assert {r["method"] for r in rows} == {"ties", "task_arithmetic"}
    assert all(set(r["per_task"]) == {"demo_arith", "demo_antonym"} for r in rows)  # reported on test
    # selected on the validation twins, whose specialists are the test tasks' specialists
    assert all(0.0 <= r["validation"] < float("inf") for r in rows), rows
    # the same inputs on the same test tasks: one best-specialist bar for every row
    assert len({r["best_specialist_mean"] for r in rows}) == 1 and 0.0 <= rows[0]["best_specialist_mean"] <= 1.0
    assert len(list((tmp_path / "art" / "store").glob("deltas-*"))) == 1  # one deltas artifact for every point
    # pruned: of the three points' models only the two winners' (rebuilt for the test split) remain
    assert len(list((tmp_path / "art" / "store").glob("save-*"))) == 2
    assert json.loads((tmp_path / "art" / "leaderboard.json").read_text()) == rows
    # the test items (eval.limit 3) of every model behind the row's paired bootstrap intervals
    for r in rows:
        assert set(r["items"]) == {"merged", "base", "a", "b", "c"} and len(r["items"]["merged"]["demo_arith"]) == 3
        defined = {k for k in ("test_mean", "normalized_accuracy", "gain_recovery") if r[k] is not None}
        assert set(r["intervals"]) == defined | {"margin"}  # an interval for every number the row has
        low, high = r["intervals"]["test_mean"]
        assert low <= r["test_mean"] <= high and r["interval_level"] == 0.95
    assert "[...]: 95% paired bootstrap interval over the test items" in format_leaderboard(rows)


def _lean_params(tmp_path, tiny_models, **eval_section):
    """Task arithmetic over the tiny models, the merged model alone evaluated on one task."""
    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art", method="task_arithmetic",
                          combine={"lambda": 1.0})
    raw = yaml.safe_load(params.read_text())
    raw["eval"].update({"tasks": ["demo_arith"], "limit": 2, "evaluate_inputs": False, **eval_section})
    params.write_text(yaml.safe_dump(raw))
    return params


def _grid(tmp_path, grid, **options):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"grid": grid, "select": "mean", **options}))
    return path


def test_nothing_runs_when_the_params_or_a_grid_point_are_invalid(prefect_harness, tiny_models, tmp_path):
    import pytest

    from flows.merge_and_eval import merge_and_eval
    from flows.sweep import sweep
    from merging.errors import MergeConfigError

    params = _lean_params(tmp_path, tiny_models)
    bad_point = _grid(tmp_path, [{"method": "task_arithmetic", "combine": {"lambda": [0.5]}},
                                 {"method": "ties", "sparsify": {"densty": [0.2]}}])
    with pytest.raises(MergeConfigError, match=r"merge\.sparsify\.densty: not a parameter of 'ties'"):
        sweep(str(bad_point), str(params))
    with pytest.raises(MergeConfigError, match=r"eval\.tasks is empty"):
        merge_and_eval(str(params), {"eval!": {"limit": 2}})  # replaced whole: no task left
    no_tasks = _lean_params(tmp_path, tiny_models, tasks=[])
    with pytest.raises(MergeConfigError, match=r"eval\.tasks is empty"):
        sweep(str(_grid(tmp_path, [{"method": "task_arithmetic", "combine": {"lambda": [0.5]}}])), str(no_tasks))
    assert not (tmp_path / "art").exists()  # refused before the first stage


def test_pruning_spares_artifacts_the_sweep_did_not_create_or_another_run_leases(prefect_harness, tiny_models, tmp_path,
                                                                              monkeypatch):
    """Issue 15: pruning deleted every point's sparsify/combine/save folders, also while another
    run used them. Now it deletes only what the sweep created and nobody leases."""
    import contextlib
    from pathlib import Path

    from flows import merge_and_eval as flow_module
    from flows.sweep import sweep
    from merging.io.artifacts import lease, remove_unleased

    params = _lean_params(tmp_path, tiny_models)
    users = flow_module.merge_and_eval(str(params), {"merge.combine.lambda": 0.5})["artifacts"]  # before the sweep
    original, others, leased = flow_module.run_pipeline, contextlib.ExitStack(), {}

    def run_pipeline(params, refresh=False, leases=None):
        produced = original(params, refresh, leases)
        if params.merge.combine["lambda"] == 1.0:  # another run starts using this point's model
            others.enter_context(lease(produced["save"]))  # flock: another descriptor is another holder
            leased.update(produced)
        return produced

    monkeypatch.setattr(flow_module, "run_pipeline", run_pipeline)
    store = tmp_path / "art" / "store"
    with others:
        sweep(str(_grid(tmp_path, [{"method": "task_arithmetic", "combine": {"lambda": [0.5, 1.0, 1.5]}}], prune=True)),
              str(params))
        assert {p.name for p in store.glob("save-*")} == {Path(users["save"]).name, Path(leased["save"]).name}
        assert {p.name for p in store.glob("combine-*")} == {Path(users["combine"]).name}  # 1.0's was not leased
        assert Path(users["sparsify"]).is_dir()  # shared by every point, made by the user's run
        assert not remove_unleased(leased["save"])
    assert remove_unleased(leased["save"]) and not Path(leased["save"]).exists()  # the other run is done with it


def test_every_point_of_the_repos_sweep_file_is_valid_params():
    """The leaderboard's grid (sweep.yaml) against the repo's params.yaml: each point's keys sit in
    the stage that reads them and every value validates, before anything runs."""
    from merging.config import read_yaml
    from merging.pipeline_params import load_params, merge_config

    repo = Path(__file__).resolve().parents[2]
    points = expand_grid(read_yaml(repo / "sweep.yaml")["grid"])
    names = {p["name"] for p in points}
    assert {"task_arithmetic_core", "ties_core", "tsv_m_core", "iso_c_core", "knots_ties"} <= names
    for point in points:
        params = load_params(repo / "params.yaml", {k: v for k, v in point.items() if k != "name"})
        merge_config(params)  # method parameters resolve (merge_space included)


def test_a_point_prunes_statistics_only_when_they_belong_to_its_recipe(tmp_path):
    """RegMean++'s collect_stats artifact is keyed by the merge settings (one per trial: pruned
    with the point); RegMean's is per model and data, shared by every point (kept)."""
    from flows.sweep import prunable
    from merging.io.artifacts import write_manifest

    def folder(name: str, params: dict) -> str:
        path = tmp_path / name
        path.mkdir()
        write_manifest(path, {"stage": name.split("-")[0], "params": params})
        return str(path)

    shared = {"models": [], "stats": {}, "merge.method": "regmean", "pipeline.device": "cpu"}
    point = {"combine": folder("combine-1", {}), "save": folder("save-1", {}), "fetch": folder("fetch-1", {})}
    per_model = {"artifacts": {**point, "collect_stats": folder("collect_stats-1", shared)}}
    assert prunable(per_model) == {point["combine"], point["save"]}
    recipe = {"artifacts": {**point, "collect_stats": folder("collect_stats-2", {**shared, "merge.combine": {"alpha": 0.1}})}}
    assert prunable(recipe) == {point["combine"], point["save"], recipe["artifacts"]["collect_stats"]}
