"""Paired bootstrap intervals: the exact bootstrap distribution of a tiny case against an
independent brute force in fractions, the percentile rule, pairing, coverage, determinism."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from merging.bootstrap import (
    bootstrap_replicates,
    decode_values,
    encode_values,
    intervals,
    mean_of_runs,
    percentile_interval,
    replicates_from_indices,
)
from merging.errors import ArtifactError
from merging.metrics import summarize_scores

# two tasks; t1 has 3 items, t2 has 2; s1 / s2 are the specialists
ITEMS = {"merged": {"t1": [1, 0, 1], "t2": [1, 0]}, "base": {"t1": [0, 0, 1], "t2": [0, 0]},
         "s1": {"t1": [1, 1, 1], "t2": [0, 0]}, "s2": {"t1": [0, 1, 0], "t2": [1, 1]}}
SPECIALISTS = {"t1": "s1", "t2": "s2"}


def _every_resample() -> dict[str, torch.Tensor]:
    """All 27 * 4 equally likely index draws of the two tasks, one per row: the exact bootstrap."""
    rows = list(itertools.product(itertools.product(range(3), repeat=3), itertools.product(range(2), repeat=2)))
    return {"t1": torch.tensor([a for a, _ in rows]), "t2": torch.tensor([b for _, b in rows])}


def _brute_force() -> dict[str, list]:
    """The same statistics, resample by resample, in exact fractions (no torch)."""
    out: dict[str, list] = {"mean_merged": [], "n_t1": [], "n_mean": [], "g_t1": [], "g_mean": []}
    for a, b in itertools.product(itertools.product(range(3), repeat=3), itertools.product(range(2), repeat=2)):
        acc = {m: {"t1": Fraction(sum(ITEMS[m]["t1"][i] for i in a), 3), "t2": Fraction(sum(ITEMS[m]["t2"][i] for i in b), 2)}
               for m in ITEMS}
        out["mean_merged"].append((acc["merged"]["t1"] + acc["merged"]["t2"]) / 2)
        n = {t: acc["merged"][t] / acc[s][t] if acc[s][t] else None for t, s in SPECIALISTS.items()}
        out["n_t1"].append(n["t1"])
        out["n_mean"].append(None if None in n.values() else (n["t1"] + n["t2"]) / 2)
        # gain recovery: t2's specialist gains 1.0 over the base on the full sample, t1's 1/3
        g = {t: (acc["merged"][t] - acc["base"][t]) / (acc[s][t] - acc["base"][t])
             if acc[s][t] - acc["base"][t] > 0 else None for t, s in SPECIALISTS.items()}
        out["g_t1"].append(g["t1"])
        out["g_mean"].append(None if None in g.values() else (g["t1"] + g["t2"]) / 2)
    return out


def _as_float(values: list) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def test_replicates_of_every_resample_match_a_brute_force_in_fractions():
    reps = replicates_from_indices(ITEMS, SPECIALISTS, _every_resample())
    expected = _brute_force()
    pairs = {"mean_merged": ("mean", "merged"), "n_t1": ("normalized_accuracy", "t1"),
             "n_mean": ("normalized_accuracy", "mean"), "g_t1": ("gain_recovery", "t1"),
             "g_mean": ("gain_recovery", "mean")}
    for name, key in pairs.items():
        assert torch.allclose(reps[key], torch.tensor(_as_float(expected[name]), dtype=torch.float64), equal_nan=True), name
    # the exact bootstrap mean of a task's accuracy is its full-sample accuracy
    assert reps["accuracy", "merged", "t1"].mean().item() == pytest.approx(2 / 3)
    # the point estimates these are intervals of exist for both tasks
    point = summarize_scores({m: {t: sum(v) / len(v) for t, v in s.items()} for m, s in ITEMS.items()}, SPECIALISTS)
    assert point["normalized_accuracy"]["t1"] == pytest.approx(2 / 3) and point["gain_recovery"]["t2"] == pytest.approx(0.5)


def test_percentile_interval_interpolates_between_order_statistics_and_skips_undefined_replicates():
    values = torch.tensor([4.0, float("nan"), 1.0, 3.0, 2.0, 5.0], dtype=torch.float64)  # defined: 1..5
    # level 0.5: the 0.25 and 0.75 quantiles of 1..5 at positions 1.0 and 3.0 -> 2 and 4
    assert percentile_interval(values, 0.5) == [2.0, 4.0]
    # level 0.9: positions 0.05 * 4 = 0.2 and 0.95 * 4 = 3.8 -> 1.2 and 4.8
    assert percentile_interval(values, 0.9) == pytest.approx([1.2, 4.8])
    assert percentile_interval(torch.tensor([float("nan")]), 0.95) is None


def test_a_merge_equal_to_its_specialists_has_a_normalized_accuracy_of_exactly_one_in_every_replicate():
    """Paired: the same item draws for the merged model and the specialist."""
    gen = torch.Generator().manual_seed(1)
    values = {t: (torch.rand(200, generator=gen) < 0.6).int().tolist() for t in ("t1", "t2")}
    items = {"merged": values, "s1": {"t1": values["t1"]}, "s2": {"t2": values["t2"]},
             "base": {t: [0] * 200 for t in values}}
    reps = bootstrap_replicates(items, SPECIALISTS, resamples=500, seed=0)
    found = intervals(reps, 0.95)
    assert found["normalized_accuracy"]["mean"] == [1.0, 1.0] and found["gain_recovery"]["t1"] == [1.0, 1.0]
    low, high = found["accuracy"]["merged"]["t1"]
    assert low < sum(values["t1"]) / 200 < high and 0.08 < high - low < 0.16  # about 2 * 1.96 * sqrt(.6 * .4 / 200)


def test_95_percent_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    gen = torch.Generator().manual_seed(7)
    covered = 0
    trials = 200
    for trial in range(trials):
        values = (torch.rand(200, generator=gen) < 0.7).int().tolist()
        reps = bootstrap_replicates({"merged": {"t": values}}, {}, resamples=500, seed=trial)
        low, high = percentile_interval(reps["accuracy", "merged", "t"], 0.95)
        covered += low <= 0.7 <= high
    assert 0.90 <= covered / trials <= 0.99


def test_replicates_are_deterministic_under_the_seed_and_stream():
    first = bootstrap_replicates(ITEMS, SPECIALISTS, resamples=50, seed=3, stream="zoo0")
    again = bootstrap_replicates(ITEMS, SPECIALISTS, resamples=50, seed=3, stream="zoo0")
    assert first.keys() == again.keys()
    assert all(torch.allclose(first[k], again[k], rtol=0, atol=0, equal_nan=True) for k in first)
    for other in (bootstrap_replicates(ITEMS, SPECIALISTS, resamples=50, seed=4, stream="zoo0"),
                  bootstrap_replicates(ITEMS, SPECIALISTS, resamples=50, seed=3, stream="zoo1")):
        assert not torch.equal(first["mean", "merged"], other["mean", "merged"])


def test_mean_of_runs_averages_replicates_index_by_index_over_the_keys_all_runs_have():
    one = {("mean", "merged"): torch.tensor([0.2, 0.4]), ("gain_recovery", "mean"): torch.tensor([1.0, 2.0])}
    two = {("mean", "merged"): torch.tensor([0.6, 0.8])}
    combined = mean_of_runs([one, two])
    assert list(combined) == [("mean", "merged")] and torch.allclose(combined["mean", "merged"], torch.tensor([0.4, 0.6]))


def test_models_scored_on_different_item_counts_are_refused_by_name():
    items = {"merged": {"t1": [1, 0, 1]}, "s1": {"t1": [1, 0]}}
    with pytest.raises(ArtifactError, match=r"task 't1': model 's1' has 2 items, 'merged' has 3"):
        bootstrap_replicates(items, {"t1": "s1"}, resamples=10, seed=0)


def test_per_item_values_are_stored_compactly_and_read_back():
    assert encode_values([1.0, 0.0, 1.0]) == "101" and decode_values("101") == [1.0, 0.0, 1.0]
    assert encode_values([0.5, 1.0]) == [0.5, 1.0] and decode_values([0.5, 1]) == [0.5, 1.0]
