"""The sweep flow: grid points as subflows over shared artifacts, selection on validation
tasks, winners reported on test tasks, a leaderboard."""

from __future__ import annotations

import json

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
    from flows.sweep import sweep

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
