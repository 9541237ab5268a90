"""Normalized accuracy and gain recovery arithmetic, and the metrics.json schema."""

import pytest

from merging.metrics import gain_recovery, normalized_accuracy, summarize_scores


def test_arithmetic():
    assert normalized_accuracy(0.45, 0.9) == pytest.approx(0.5)
    assert gain_recovery(0.6, 0.2, 1.0) == pytest.approx(0.5)
    assert gain_recovery(0.6, 0.5, 0.5) is None  # the specialist gained nothing
    assert normalized_accuracy(0.3, 0.0) is None


def test_summary_schema_and_means():
    accuracy = {
        "merged": {"a": 0.8, "b": 0.5},
        "base": {"a": 0.2, "b": 0.3},
        "spec_a": {"a": 1.0, "b": 0.1},
        "spec_b": {"a": 0.3, "b": 0.7},
    }
    metrics = summarize_scores(accuracy, {"a": "spec_a", "b": "spec_b"})
    assert metrics["tasks"] == ["a", "b"]
    assert metrics["mean"]["merged"] == pytest.approx(0.65)
    assert metrics["normalized_accuracy"]["a"] == pytest.approx(0.8)
    assert metrics["normalized_accuracy"]["b"] == pytest.approx(0.5 / 0.7)
    assert metrics["normalized_accuracy"]["mean"] == pytest.approx((0.8 + 0.5 / 0.7) / 2)
    assert metrics["gain_recovery"]["a"] == pytest.approx(0.75)
    assert metrics["gain_recovery"]["b"] == pytest.approx(0.5)
    assert metrics["gain_recovery"]["mean"] == pytest.approx(0.625)
