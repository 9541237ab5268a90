"""A sweep killed mid-way and restarted (issue 15): with pruning on, the finished points'
artifacts are gone, yet the restart runs only the points that had not finished, from their
recorded metrics, and ends with the leaderboard of an uninterrupted sweep."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.pipeline_helpers import write_params

LAMBDAS = [0.3, 0.6, 0.9, 1.2]


class Killed(Exception):
    pass


def test_restarted_sweep_reruns_only_unfinished_points(prefect_harness, tiny_models, tmp_path, monkeypatch):
    from flows import merge_and_eval as flow_module
    from flows.sweep import POINTS, sweep

    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art", method="task_arithmetic",
                          combine={"lambda": 1.0})
    raw = yaml.safe_load(params.read_text())
    raw["eval"].update({"tasks": ["demo_arith"], "limit": 2, "evaluate_inputs": False})
    params.write_text(yaml.safe_dump(raw))
    grid = tmp_path / "sweep.yaml"
    grid.write_text(yaml.safe_dump({"grid": [{"method": "task_arithmetic", "combine": {"lambda": LAMBDAS}}],
                                    "select": "mean", "prune": True}))
    original, ran = flow_module.run_pipeline, []

    def run_pipeline(params, refresh=False, leases=None):  # one call per merge-and-eval run
        ran.append(params.merge.combine["lambda"])
        if len(ran) == kill_at:
            raise Killed(f"killed while running lambda={ran[-1]}")
        return original(params, refresh, leases)

    monkeypatch.setattr(flow_module, "run_pipeline", run_pipeline)
    kill_at = 3
    with pytest.raises(Killed):
        sweep(str(grid), str(params))
    store = tmp_path / "art" / "store"
    records = {p: p.stat().st_mtime_ns for p in (store / POINTS).glob("*.json")}
    assert ran == LAMBDAS[:3] and len(records) == 2  # two points finished, the third died
    assert len(list(store.glob("save-*"))) == 1  # pruned, but for the last finished point's (a later point might share it)

    ran.clear()
    kill_at = 0
    rows = sweep(str(grid), str(params))
    assert ran == LAMBDAS[2:]  # the finished points were not run again
    assert {p: p.stat().st_mtime_ns for p in records} == records and len(list((store / POINTS).glob("*.json"))) == 4

    ran.clear()
    uninterrupted = sweep(str(grid), str(params), refresh=True)  # every point computed anew
    assert ran == LAMBDAS
    assert rows == uninterrupted and rows[0]["setting"].startswith("task_arithmetic lambda=")
    assert json.loads((tmp_path / "art" / "leaderboard.json").read_text()) == uninterrupted
