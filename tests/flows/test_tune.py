"""The tune flow: search spaces, Optuna studies that resume where they stopped (finished trials
kept, a trial left running retried, the same suggestions as an uninterrupted run), and a real
tune over the tiny models reported like a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows import tune as tune_module
from flows.tune import Space, parse_tune_file, run_study
from merging.errors import MergeConfigError
from tests.pipeline_helpers import write_params


def _tune_file(tmp_path: Path, **extra) -> Path:
    spec = {"select": "normalized_accuracy", "trials": 3, "seed": 0, "startup_trials": 1, "methods": [
        {"method": "ties", "sparsify": {"density": {"low": 0.1, "high": 0.9}},
         "combine": {"lambda": 1.0, "sign_tie_rule": ["positive", "majority"]}}], **extra}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_space_suggests_fixed_values_choices_and_ranges():
    import optuna

    space = Space({"method": "drm", "name": "drm_h", "decompose": {"direction": "horizontal"},
                   "sparsify": {"singular_matrices_drop_rate": {"low": 0.2, "high": 0.9}, "rank": {"low": 1, "high": 4}},
                   "combine": {"lambda": {"low": 0.5, "high": 3.0, "log": True}, "mode": [{"a": 1}, "b"]}}, "t")
    trial = optuna.trial.FixedTrial({"sparsify.singular_matrices_drop_rate": 0.5, "sparsify.rank": 3,
                                     "combine.lambda": 2.4, "combine.mode": 0})
    assert space.suggest(trial) == {
        "merge.method": "drm", "name": "drm_h", "merge.decompose!": {"direction": "horizontal"},
        "merge.sparsify!": {"singular_matrices_drop_rate": 0.5, "rank": 3}, "merge.combine!": {"lambda": 2.4, "mode": {"a": 1}}}


@pytest.mark.parametrize("change, match", [
    ({"methods": []}, "non-empty 'methods'"),
    ({"select": "accuracy"}, "select must be one of"),
    ({"trials": 0}, "positive integer"),
    ({"budget": 3}, r"unknown key\(s\) \['budget'\]"),
    ({"methods": [{"method": "ties", "sparsify": {"density": {"low": 0.9, "high": 0.1}}}]}, "low <= high"),
    ({"methods": [{"method": "ties", "combine": {"lambda": {"low": 0, "high": 1, "log": True}}}]}, "low > 0 for log"),
    ({"methods": [{"method": "ties", "sparsify": {"density": {"low": 0.1}}}]}, "a range is"),
    ({"methods": [{"method": "ties"}, {"method": "ties"}]}, "two methods are named 'ties'"),
    ({"methods": [{"method": "ties", "merge": {}}]}, "unknown key"),
])
def test_bad_tune_files_name_the_key(tmp_path, change, match):
    with pytest.raises(MergeConfigError, match=match):
        parse_tune_file(str(_tune_file(tmp_path, **change)))


def _fake_point(calls: list):
    """run_point without merging: a smooth score of the trial's density, recorded per call."""
    def run_point(params_file, overrides, name, refresh=False):
        density, rule = overrides["merge.sparsify!"]["density"], overrides["merge.combine!"]["sign_tie_rule"]
        value = 1.0 - (density - 0.6) ** 2 - (0.01 if rule == "majority" else 0.0)
        calls.append((density, rule, name))
        return {"normalized_accuracy": {"mean": value}, "gain_recovery": {"mean": value}, "mean": {"merged": value}}, True
    return run_point


def _params(tmp_path: Path, tiny_models, store: str) -> Path:
    params = write_params(tmp_path / f"params-{store}.yaml", tiny_models, tmp_path / store)
    raw = yaml.safe_load(params.read_text())
    raw["eval"]["validation_tasks"] = ["demo_arith_val", "demo_antonym_val"]
    params.write_text(yaml.safe_dump(raw))
    return params


def test_an_interrupted_study_resumes_with_the_suggestions_of_an_uninterrupted_one(tmp_path, tiny_models, monkeypatch):
    from optuna.trial import TrialState

    settings, (space,) = parse_tune_file(str(_tune_file(tmp_path)))
    whole, parts = [], []
    monkeypatch.setattr(tune_module, "run_point", _fake_point(whole))
    run_study(str(_params(tmp_path, tiny_models, "whole")), space, settings)
    trials = [c for c in whole if "(best)" not in c[2]]
    assert len(trials) == 3

    params = _params(tmp_path, tiny_models, "parts")
    monkeypatch.setattr(tune_module, "run_point", _fake_point(parts))
    space.trials = 2
    run_study(str(params), space, settings)  # "killed" after two trials
    space.trials = 3
    _, _, study = run_study(str(params), space, settings)  # resumed: one more trial, the first two kept
    resumed = [c for c in parts if "(best)" not in c[2]]
    assert [c[:2] for c in resumed] == [c[:2] for c in trials]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    assert (tmp_path / "parts" / "store" / "tune" / "studies.db").is_file()


def test_a_trial_left_running_is_retried_with_its_parameters(tmp_path, tiny_models, monkeypatch):
    from optuna.trial import TrialState

    settings, (space,) = parse_tune_file(str(_tune_file(tmp_path)))
    calls = []
    monkeypatch.setattr(tune_module, "run_point", _fake_point(calls))
    params = _params(tmp_path, tiny_models, "crash")
    space.trials = 1
    _, _, study = run_study(str(params), space, settings)
    stale = study.ask({"sparsify.density": __import__("optuna").distributions.FloatDistribution(0.1, 0.9),
                       "combine.sign_tie_rule": __import__("optuna").distributions.CategoricalDistribution([0, 1])})
    stale_params = dict(stale.params)  # a run killed while this trial ran leaves it RUNNING
    space.trials = 2
    _, _, study = run_study(str(params), space, settings)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.get_trials()[2].params == stale_params


def test_tune_reports_the_best_trial_on_test(prefect_harness, tiny_models, tmp_path):
    from flows.tune import tune

    params = _params(tmp_path, tiny_models, "art")
    tune_file = _tune_file(tmp_path, trials=2)
    rows = tune(str(tune_file), str(params))
    assert [r["method"] for r in rows] == ["ties"] and rows[0]["trials"] == 2
    assert set(rows[0]["per_task"]) == {"demo_arith", "demo_antonym"}  # reported on the test tasks
    history = (tmp_path / "art" / "tune" / "history" / "ties.csv").read_text().splitlines()
    assert history[0] == "trial,value,best,params" and len(history) == 3
    values = [float(line.split(",")[1]) for line in history[1:]]
    assert rows[0]["validation"] == pytest.approx(max(values))  # the best trial is the one reported
    assert len(list((tmp_path / "art" / "store").glob("deltas-*"))) == 1  # one deltas artifact for every trial
    # each trial's sparsify/combine/save were pruned once scored; the best's were made again for the test split
    assert len(list((tmp_path / "art" / "store").glob("save-*"))) == 1
    assert json.loads((tmp_path / "art" / "tune" / "leaderboard.json").read_text()) == rows
    # a rerun resumes the finished study: no trial runs again
    assert tune(str(tune_file), str(params)) == rows


def test_the_repository_tune_file_validates_against_params_yaml():
    """Every study of tune.yaml at both ends of every range is a valid params.yaml override."""
    import optuna

    from merging.pipeline_params import load_params

    root = Path(__file__).resolve().parents[2]
    settings, spaces = parse_tune_file(str(root / "tune.yaml"))
    assert settings["trials"] == 8 and {"drm_h", "drm_v", "iso_c_core", "knots_ties"} <= {s.name for s in spaces}
    for space in spaces:
        for end in ("low", "high"):
            values = {f"{section}.{key}": (value[end] if isinstance(value, dict) else 0)
                      for section, key, value in space.axes if isinstance(value, (dict, list))}
            override = space.suggest(optuna.trial.FixedTrial(values))
            load_params(str(root / "params.yaml"), {k: v for k, v in override.items() if k != "name"})


def test_method_picks_entries_of_the_tune_file_by_name(tmp_path):
    from flows.tune import select_spaces

    path = _tune_file(tmp_path, methods=[{"method": "ties"}, {"method": "drm", "name": "drm_h"}, {"method": "regmean"}])
    _, spaces = parse_tune_file(str(path))
    assert [s.name for s in select_spaces(spaces, ["regmean", "ties"], str(path))] == ["ties", "regmean"]  # file order
    assert select_spaces(spaces, None, str(path)) == spaces
    with pytest.raises(MergeConfigError, match=r"--method 'drm'.*no such entry.*\['ties', 'drm_h', 'regmean'\]"):
        select_spaces(spaces, ["drm"], str(path))


def test_the_leaderboard_refuses_method_with_a_grid(tmp_path):
    from flows.leaderboard import run

    grid = tmp_path / "sweep.yaml"
    grid.write_text(yaml.safe_dump({"grid": [{"method": "ties"}]}))
    with pytest.raises(MergeConfigError, match="--method picks entries of a tune file"):
        run(str(tmp_path / "params.yaml"), str(grid), [0], methods=["ties"])
