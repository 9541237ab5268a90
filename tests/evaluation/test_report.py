"""The report's bootstrap intervals, its merged-vs-specialist table and chart, from evaluation
results with per-item scores."""

from __future__ import annotations

import csv
import json

import pytest

from evaluation.report import build_metrics, format_table, vs_specialist_rows, write_report
from merging.bootstrap import bootstrap_replicates, percentile_interval
from merging.pipeline_params import parse_params


def _params(**eval_section):
    return parse_params({
        "models": {"base": {"name": "base", "source": "/x/base"},
                   "inputs": [{"name": "a", "source": "/x/a", "task": "t1"}, {"name": "b", "source": "/x/b", "task": "t2"}]},
        "merge": {"method": "task_arithmetic"}, "eval": {"tasks": ["t1", "t2"], **eval_section}})


def _result(t1: str, t2: str) -> dict:
    scores = {"t1": t1.count("1") / len(t1), "t2": t2.count("1") / len(t2)}
    return {"scores": scores, "items": {"t1": {"metric": "acc,none", "values": t1}, "t2": {"metric": "acc,none", "values": t2}}}


RESULTS = {"merged": _result("1101101101" * 4, "1100110011" * 4), "a": _result("1111111101" * 4, "0000100001" * 4),
           "b": _result("0100100001" * 4, "1110111011" * 4), "base": _result("0100100100" * 4, "0000100010" * 4)}


def test_metrics_carry_paired_bootstrap_intervals_of_every_number():
    metrics = build_metrics(_params(bootstrap_resamples=400, bootstrap_seed=5), RESULTS)
    found = metrics["intervals"]
    assert (found["level"], found["resamples"], found["seed"]) == (0.95, 400, 5)
    assert metrics["specialists"] == {"t1": "a", "t2": "b"}
    # the same draws as merging.bootstrap from the per-item strings
    items = {m: {t: e["values"] for t, e in r["items"].items()} for m, r in RESULTS.items()}
    replicates = bootstrap_replicates(items, {"t1": "a", "t2": "b"}, resamples=400, seed=5)
    assert found["normalized_accuracy"]["mean"] == percentile_interval(replicates["normalized_accuracy", "mean"], 0.95)
    # every point estimate lies inside its interval
    checks = [(metrics["accuracy"][m][t], found["accuracy"][m][t]) for m in RESULTS for t in ("t1", "t2")]
    checks += [(metrics["mean"][m], found["mean"][m]) for m in RESULTS]
    checks += [(metrics[k][t], found[k][t]) for k in ("normalized_accuracy", "gain_recovery") for t in ("t1", "t2", "mean")]
    for value, (low, high) in checks:
        assert low <= value <= high
    assert 0.1 < found["accuracy"]["merged"]["t1"][1] - found["accuracy"]["merged"]["t1"][0] < 0.4  # 40 items
    assert "normalized accuracy (merged / specialist): 0.764 [" in format_table(metrics)


def test_no_intervals_without_items_or_resamples():
    assert "intervals" not in build_metrics(_params(bootstrap_resamples=0), RESULTS)
    bare = {name: {"scores": r["scores"]} for name, r in RESULTS.items()}
    metrics = build_metrics(_params(), bare)
    assert "intervals" not in metrics and "[" not in format_table(metrics)
    assert vs_specialist_rows(metrics)[0] == {"task": "t1", "specialist model": "a", "merged": "0.700", "specialist": "0.900",
                                              "base": "0.300", "normalized": "0.778"}


def test_table_rows_and_report_files(tmp_path):
    params = _params(bootstrap_resamples=300)
    evaluate = tmp_path / "evaluate"
    evaluate.mkdir()
    (evaluate / "results.json").write_text(json.dumps(RESULTS))
    out = tmp_path / "report"
    out.mkdir()
    assert write_report(params, {"evaluate": evaluate}, out, tmp_path) == ["metrics.json", "plots/scores.csv", "plots/scores.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = vs_specialist_rows(metrics)
    assert [r["task"] for r in rows] == ["t1", "t2"] and rows[1]["specialist model"] == "b"
    low, high = metrics["intervals"]["accuracy"]["merged"]["t2"]
    assert rows[1]["merged (95% interval)"] == f"0.600 [{low:.3f}, {high:.3f}]"
    assert rows[0]["normalized (95% interval)"].startswith(f"{0.7 / 0.9:.3f} [")
    with open(out / "plots" / "scores.csv") as f:
        csv_rows = list(csv.DictReader(f))
    merged_t2 = next(r for r in csv_rows if r["model"] == "merged" and r["task"] == "t2")
    assert float(merged_t2["accuracy"]) == 0.6 and float(merged_t2["low"]) == pytest.approx(low, abs=1e-6)
    assert (out / "plots" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
