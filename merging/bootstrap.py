"""Paired bootstrap intervals for the merge quality metrics (``merging.metrics``).

Every model is scored on the same items of a task, so the numbers that compare models
(normalized accuracy m_t / s_t, gain recovery (m_t - b_t) / (s_t - b_t)) are resampled
*paired*: replicate r draws n_t item indices with replacement for task t (a CPU generator
seeded by (seed, task, stream), ``merging.rng``), and every model's accuracy on t in that
replicate is its mean over those same indices. Tasks are resampled independently. Each
replicate then goes through the metrics' formulas:

    acc_r(model, t)   = mean_i values[model][t][idx_r,t,i]
    mean_r(model)     = mean_t acc_r(model, t)
    n_r(t)            = acc_r(m, t) / acc_r(s_t, t)                          (undefined if acc_r(s_t, t) = 0)
    g_r(t)            = (acc_r(m, t) - acc_r(b, t)) / (acc_r(s_t, t) - acc_r(b, t))   (undefined if <= 1e-9)
    n_r, g_r          = their means over the tasks that have a point estimate

and the interval at ``level`` is the percentile interval of the replicates (linear
interpolation, as numpy's default), over the replicates where the statistic is defined (a
ratio whose denominator vanishes in a replicate is left out, not clipped). Several runs (zoo
seeds) are combined by averaging their replicates index by index (``mean_of_runs``): each
run resampled on its own stream, this is the bootstrap distribution of the mean over runs.

Per-item values are what lm-eval scores each item with on the task's main metric (acc: 0 or
1); ``decode_values`` reads the compact form the evaluation cache stores.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from statistics import fmean

import torch

from merging.errors import ArtifactError
from merging.metrics import GAIN_EPS
from merging.rng import generator_for

__all__ = ["bootstrap_replicates", "decode_values", "encode_values", "mean_of_runs", "percentile_interval",
           "replicates_from_indices", "resample_indices", "intervals", "summary_replicates", "Key"]

Key = tuple[str, ...]  # ("accuracy", model, task), ("mean", model), ("normalized_accuracy", task | "mean"), ...


def encode_values(values: Sequence[float]) -> str | list[float]:
    """Per-item values as stored: a string of '0'/'1' digits when every value is 0 or 1
    (accuracy), else the list of floats."""
    if all(v in (0, 1) for v in values):
        return "".join("1" if v else "0" for v in values)
    return [float(v) for v in values]


def decode_values(stored: str | Sequence[float]) -> list[float]:
    """The per-item values ``encode_values`` stored."""
    if isinstance(stored, str):
        return [1.0 if c == "1" else 0.0 for c in stored]
    return [float(v) for v in stored]


def resample_indices(n: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """(resamples, n) item indices drawn with replacement."""
    return torch.randint(n, (resamples, n), generator=generator)


def bootstrap_replicates(items: Mapping[str, Mapping[str, Sequence[float]]], specialists: Mapping[str, str], *,
                         resamples: int, seed: int, stream: str = "", merged: str = "merged",
                         base: str = "base") -> dict[Key, torch.Tensor]:
    """Replicates of every metric from per-item values ``items[model][task]``.

    Args:
        items: per model, per task, the values of the task's items (in the same item order for
            every model; a model without items for a task is left out of that task).
        specialists: task -> the model fine-tuned for it.
        resamples: replicates to draw.
        seed, stream: seed the per-task generators (another stream: independent draws).
        merged, base: the names of the merged model and the base in ``items``.

    Returns:
        ``replicates_from_indices`` of the drawn indices.

    Raises:
        ArtifactError: two models scored a different number of items on a task.
    """
    indices = {task: resample_indices(len(values), resamples, generator_for(seed, task, f"bootstrap:{stream}"))
               for task, values in items.get(merged, {}).items() if len(values)}
    return replicates_from_indices(items, specialists, indices, merged=merged, base=base)


def replicates_from_indices(items: Mapping[str, Mapping[str, Sequence[float]]], specialists: Mapping[str, str],
                            indices: Mapping[str, torch.Tensor], *, merged: str = "merged",
                            base: str = "base") -> dict[Key, torch.Tensor]:
    """The metrics of each row of resampled item indices: ``indices[task]`` is (R, n_task)
    (the same R for every task). Keys: ("accuracy", model, task), ("mean", model) for models
    with items on every task, ("normalized_accuracy", task | "mean") and ("gain_recovery", task
    | "mean") where the point estimate exists (``merging.metrics.summarize_scores``); an
    undefined replicate is NaN."""
    tasks = sorted(indices)
    out: dict[Key, torch.Tensor] = {}
    full: dict[tuple[str, str], float] = {}  # the full-sample accuracies: which ratios have a point estimate
    for model, by_task in items.items():
        for task in tasks:
            if task in by_task and len(by_task[task]):
                values = torch.tensor(decode_values(by_task[task]), dtype=torch.float64)
                if len(values) != indices[task].shape[1]:
                    raise ArtifactError(f"per-item scores of task {task!r}: model {model!r} has {len(values)} items, "
                                        f"{merged!r} has {indices[task].shape[1]}; evaluate every model with the same "
                                        "eval settings (eval.limit) to compare them")
                out["accuracy", model, task] = values[indices[task]].mean(dim=1)  # (R,)
                full[model, task] = float(values.mean())
        if tasks and all(("accuracy", model, t) in out for t in tasks):
            out["mean", model] = torch.stack([out["accuracy", model, t] for t in tasks]).mean(dim=0)
    normalized, recovery = [], []
    for task in tasks:
        spec = specialists.get(task)
        if ("accuracy", spec, task) not in out or ("accuracy", merged, task) not in out:
            continue
        m, s = out["accuracy", merged, task], out["accuracy", spec, task]
        if full[spec, task] > 0:
            out["normalized_accuracy", task] = torch.where(s > 0, m / s, torch.nan)
            normalized.append(out["normalized_accuracy", task])
        if ("accuracy", base, task) in out:
            b = out["accuracy", base, task]
            if full[spec, task] - full[base, task] > GAIN_EPS:
                gain = s - b
                out["gain_recovery", task] = torch.where(gain > GAIN_EPS, (m - b) / gain, torch.nan)
                recovery.append(out["gain_recovery", task])
    if normalized:
        out["normalized_accuracy", "mean"] = torch.stack(normalized).mean(dim=0)  # NaN where any task is
    if recovery:
        out["gain_recovery", "mean"] = torch.stack(recovery).mean(dim=0)
    return out


def percentile_interval(replicates: torch.Tensor, level: float) -> list[float] | None:
    """[low, high]: the (1 - level) / 2 and (1 + level) / 2 quantiles of the defined (non-NaN)
    replicates; None when none is defined."""
    defined = replicates[~torch.isnan(replicates)]
    if defined.numel() == 0:
        return None
    alpha = (1.0 - level) / 2
    low, high = torch.quantile(defined, torch.tensor([alpha, 1.0 - alpha], dtype=defined.dtype))
    return [float(low), float(high)]


def summary_replicates(replicates: Mapping[Key, torch.Tensor], items: Mapping[str, Mapping[str, Sequence[float]]],
                       inputs: Sequence[str], merged: str = "merged") -> dict[str, torch.Tensor]:
    """Replicates of a leaderboard row's numbers, from ``bootstrap_replicates``: ``test_mean``
    (the merged model's mean over tasks), ``normalized_accuracy`` and ``gain_recovery`` (their
    means over tasks) and ``margin``: the merged mean minus that of the input whose full-sample
    mean is highest (the best single specialist, picked once, then resampled paired)."""
    out = {}
    for column, key in (("test_mean", ("mean", merged)), ("normalized_accuracy", ("normalized_accuracy", "mean")),
                        ("gain_recovery", ("gain_recovery", "mean"))):
        if key in replicates:
            out[column] = replicates[key]
    tasks = sorted(items.get(merged, {}))
    full = {name: fmean(fmean(decode_values(items[name][t])) for t in tasks)
            for name in inputs if tasks and ("mean", name) in replicates}
    if full and ("mean", merged) in replicates:
        best = max(full, key=lambda name: full[name])
        out["margin"] = replicates["mean", merged] - replicates["mean", best]
    return out


def mean_of_runs(runs: Sequence[Mapping[Hashable, torch.Tensor]]) -> dict[Hashable, torch.Tensor]:
    """Replicates of the mean over runs of every statistic all runs have: the runs' replicates
    averaged index by index (each run drawn on its own stream)."""
    if not runs:
        return {}
    keys = set(runs[0]).intersection(*runs[1:])
    return {key: torch.stack([run[key] for run in runs]).mean(dim=0) for key in keys}


def intervals(replicates: Mapping[Key, torch.Tensor], level: float) -> dict:
    """The intervals nested as ``summarize_scores`` nests its numbers: ``{"accuracy": {model:
    {task: [lo, hi]}}, "mean": {model: [lo, hi]}, "normalized_accuracy": {task | "mean": [lo,
    hi]}, "gain_recovery": {...}}``."""
    out: dict = {"accuracy": {}, "mean": {}, "normalized_accuracy": {}, "gain_recovery": {}}
    for key, values in sorted(replicates.items()):
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = percentile_interval(values, level)
    return out
