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
    assert [m.get("data") for m in other["models"]["inputs"]] == [  # each specialist's own training prompts
        m["data"].replace(out, f"{out}-s7", 1) if m.get("data") else None for m in raw["models"]["inputs"]]
    assert any(m.get("data") for m in other["models"]["inputs"])
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


def _zoo_row(method: str, merged: dict[str, str], seed: int) -> dict:
    """A sweep row with per-item scores: two tasks, specialists a (t1) and b (t2), the base."""
    items = {"merged": merged, "a": {"t1": "1111111101" * 3, "t2": "0000100001" * 3},
             "b": {"t1": "0100100001" * 3, "t2": "1110111011" * 3}, "base": {"t1": "0100100100" * 3, "t2": "0000100010" * 3}}
    acc = {m: {t: v.count("1") / len(v) for t, v in by_task.items()} for m, by_task in items.items()}
    norm = (acc["merged"]["t1"] / acc["a"]["t1"] + acc["merged"]["t2"] / acc["b"]["t2"]) / 2
    gain = sum((acc["merged"][t] - acc["base"][t]) / (acc[s][t] - acc["base"][t]) for t, s in (("t1", "a"), ("t2", "b"))) / 2
    mean = (acc["merged"]["t1"] + acc["merged"]["t2"]) / 2
    best = max((acc[m]["t1"] + acc[m]["t2"]) / 2 for m in ("a", "b"))
    return {"method": method, "setting": f"{method} lambda=1.0", "normalized_accuracy": norm, "gain_recovery": gain,
            "test_mean": mean, "best_specialist_mean": best, "items": items, "specialists": {"t1": "a", "t2": "b"},
            "per_task": acc["merged"], "seed": seed}


def test_aggregate_puts_the_bootstrap_interval_of_the_mean_over_seeds_beside_every_number(tmp_path):
    import torch

    from evaluation.report import vs_specialist_chart
    from flows.sweep import row_replicates
    from merging.bootstrap import percentile_interval
    from merging.pipeline_params import parse_params

    params = parse_params({"models": {"base": {"name": "base", "source": "/z/base"}, "inputs": [{"name": "a", "source": "/z/a"}]},
                           "merge": {"method": "task_arithmetic"}, "eval": {"tasks": ["t1"], "bootstrap_resamples": 300}})
    per_seed = {0: [_zoo_row("ties", {"t1": "1101101101" * 3, "t2": "1100110011" * 3}, 0)],
                1: [_zoo_row("ties", {"t1": "1111101101" * 3, "t2": "1100111011" * 3}, 1)]}
    (row,) = aggregate(per_seed, params)
    # by hand: each seed's replicates on its own stream, averaged replicate by replicate
    seeds = [row_replicates(per_seed[s][0]["items"], {"t1": "a", "t2": "b"}, ["a", "b"], params, s) for s in (0, 1)]
    for column in ("test_mean", "normalized_accuracy", "gain_recovery", "margin"):
        expected = percentile_interval((seeds[0][column] + seeds[1][column]) / 2, 0.95)
        assert row["intervals"][column] == pytest.approx(expected, abs=1e-12), column
        assert row["intervals"][column][0] <= row[column]["mean"] <= row["intervals"][column][1]
    assert not torch.equal(seeds[0]["test_mean"], seeds[1]["test_mean"])  # independent draws per seed
    # one seed alone: the interval the sweep row of that seed shows
    (alone,) = aggregate({0: per_seed[0]}, params)
    assert alone["intervals"]["normalized_accuracy"] == percentile_interval(seeds[0]["normalized_accuracy"], 0.95)
    # the chart's numbers: accuracies averaged over seeds (merged t1: 0.7 and 0.8), intervals of those means
    chart = row["per_task"]
    assert chart["accuracy"]["merged"]["t1"] == pytest.approx(0.75) and chart["specialists"] == {"t1": "a", "t2": "b"}
    low, high = chart["intervals"]["accuracy"]["a"]["t1"]
    assert low <= 0.9 <= high and set(chart["accuracy"]) == {"merged", "base", "a", "b"}
    vs_specialist_chart(chart, tmp_path / "ties.png", "ties (mean over seeds 0, 1)")
    assert (tmp_path / "ties.png").read_bytes()[:4] == b"\x89PNG"
    table = format_markdown([row], [0, 1])
    lo, hi = row["intervals"]["normalized_accuracy"]
    assert f"| ties | {row['normalized_accuracy']['mean']:.3f} [{lo:.3f}, {hi:.3f}] (" in table
    assert "95% paired bootstrap interval over the test items of the mean over seeds" in table
