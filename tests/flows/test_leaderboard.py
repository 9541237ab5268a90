"""The multi-seed leaderboard: per-seed params re-pointed at that seed's zoo, aggregation."""

from __future__ import annotations

import pytest
import yaml

from flows.leaderboard import aggregate, format_markdown, seed_params
from merging.errors import MergeConfigError
from tests.pipeline_helpers import REPO


def _raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_seed_params_repoint_models_evals_and_artifacts():
    raw = _raw()
    own = seed_params(raw, raw["zoo"]["seed"])
    assert own["models"] == raw["models"] and own["eval"]["include_path"] == f"{raw['zoo']['out']}/evals"
    assert own["pipeline"]["artifacts"] == raw["pipeline"]["artifacts"]

    other = seed_params(raw, 7)
    out = raw["zoo"]["out"]
    assert other["zoo"]["seed"] == 7 and other["zoo"]["out"] == f"{out}-s7"
    assert [m["source"] for m in other["models"]["inputs"]] == [
        m["source"].replace(out, f"{out}-s7", 1) for m in raw["models"]["inputs"]]
    assert other["eval"]["include_path"] == f"{out}-s7/evals"
    assert other["pipeline"]["artifacts"] == f"{raw['pipeline']['artifacts']}-s7"
    assert other["models"]["base"] == raw["models"]["base"] and raw["zoo"]["seed"] != 7  # the input is not modified


def test_seed_params_refuses_inputs_outside_the_zoo():
    raw = _raw()
    raw["models"]["inputs"][0]["source"] = "somewhere/else"
    with pytest.raises(MergeConfigError, match="not inside zoo.out"):
        seed_params(raw, 1)


def test_aggregate_mean_range_and_margin():
    def row(method, norm, mean, best, setting):
        return {"method": method, "setting": setting, "normalized_accuracy": norm, "gain_recovery": None,
                "test_mean": mean, "best_specialist_mean": best}

    per_seed = {0: [row("ties", 0.9, 0.8, 0.5, "ties density=0.2"), row("drm_h", 0.95, 0.85, 0.5, "drm_h lambda=1.5")],
                1: [row("ties", 0.8, 0.7, 0.3, "ties density=0.4"), row("drm_h", 0.85, 0.75, 0.3, "drm_h lambda=2.0")]}
    rows = aggregate(per_seed)
    assert [r["method"] for r in rows] == ["drm_h", "ties"]  # by mean normalized accuracy
    ties = rows[1]
    assert ties["normalized_accuracy"] == {"mean": pytest.approx(0.85), "min": 0.8, "max": 0.9}
    assert ties["margin"] == {"mean": pytest.approx(0.35), "min": pytest.approx(0.3), "max": pytest.approx(0.4)}
    assert ties["gain_recovery"] is None and ties["settings"] == {"0": "ties density=0.2", "1": "ties density=0.4"}
    table = format_markdown(rows, [0, 1])
    assert "| ties | 0.850 (0.800-0.900) |" in table and "s0: density=0.2; s1: density=0.4" in table
