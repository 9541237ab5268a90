"""Merge quality metrics from per-task accuracies (pure arithmetic).

For task t with specialist model s_t (the input fine-tuned for t), base b and merged m:
    normalized accuracy   n_t = acc(m, t) / acc(s_t, t)
    gain recovery         g_t = (acc(m, t) - acc(b, t)) / (acc(s_t, t) - acc(b, t))
and their means over the tasks that have a specialist. A task whose specialist gains
nothing over the base (denominator <= 1e-9) has no gain recovery (None).
"""

from __future__ import annotations

from statistics import fmean

__all__ = ["GAIN_EPS", "normalized_accuracy", "gain_recovery", "summarize_scores"]

GAIN_EPS = 1e-9  # a specialist gaining no more than this over the base has no gain recovery


def normalized_accuracy(merged: float, specialist: float) -> float | None:
    return merged / specialist if specialist > 0 else None


def gain_recovery(merged: float, base: float, specialist: float) -> float | None:
    gain = specialist - base
    return (merged - base) / gain if gain > GAIN_EPS else None


def summarize_scores(
    accuracy: dict[str, dict[str, float]], specialists: dict[str, str], merged: str = "merged", base: str = "base"
) -> dict:
    """metrics.json content from ``accuracy[model][task]`` and ``specialists[task] = model``."""
    tasks = sorted(accuracy[merged])
    out: dict = {"tasks": tasks, "accuracy": accuracy,
                 "mean": {model: fmean(scores[t] for t in tasks) for model, scores in accuracy.items() if all(t in scores for t in tasks)}}
    normalized, recovery = {}, {}
    for task in tasks:
        spec_model = specialists.get(task)
        if spec_model is None or spec_model not in accuracy or task not in accuracy[spec_model]:
            continue
        m, s = accuracy[merged][task], accuracy[spec_model][task]
        normalized[task] = normalized_accuracy(m, s)
        if base in accuracy:
            recovery[task] = gain_recovery(m, accuracy[base][task], s)
    valid_n = [v for v in normalized.values() if v is not None]
    valid_g = [v for v in recovery.values() if v is not None]
    out["normalized_accuracy"] = {**normalized, "mean": fmean(valid_n) if valid_n else None}
    out["gain_recovery"] = {**recovery, "mean": fmean(valid_g) if valid_g else None}
    return out
