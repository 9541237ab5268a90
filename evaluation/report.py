"""The report stage: ``metrics.json`` (per-task accuracy per model, means, normalized accuracy,
gain recovery, each task's specialist and, under ``intervals``, a paired bootstrap interval of
every one of those numbers from the per-item scores, ``merging.bootstrap``),
``plots/scores.csv`` for ``dvc plots`` (every model's accuracy per task with its interval) and
``plots/scores.png`` (per task: the merged model against the task's specialist and the base,
with the intervals as error bars), in one artifact folder of the same shape on both routes
(``artifacts/report`` under DVC, the store's report and its latest copy ``<artifacts>/report``
under Prefect)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from merging.bootstrap import bootstrap_replicates, intervals
from merging.metrics import summarize_scores
from merging.pipeline_params import PipelineParams

__all__ = ["write_report", "build_metrics", "item_values", "format_table", "vs_specialist_rows", "vs_specialist_chart", "with_interval",
           "find_regressions", "params_diff", "regression_markdown", "METRICS_FILE", "SCORES_CSV", "SCORES_PNG"]

METRICS_FILE = "metrics.json"
SCORES_CSV = "plots/scores.csv"
SCORES_PNG = "plots/scores.png"


def build_metrics(params: PipelineParams, results: dict[str, dict]) -> dict:
    """metrics.json content from evaluation results (name -> result dict): ``summarize_scores``,
    the method, each task's specialist and (with per-item scores and ``eval.bootstrap_resamples``
    > 0) ``intervals``: the same numbers' paired bootstrap intervals, nested alike, with the
    level, resamples and seed they were drawn with."""
    accuracy = {name: result["scores"] for name, result in results.items()}
    specialists = {ref.task: ref.name for ref in params.models.inputs if ref.task}
    validation = dict(zip(params.eval.tasks, params.eval.validation_tasks))
    specialists |= {validation[t]: name for t, name in specialists.items() if t in validation}
    metrics = summarize_scores(accuracy, specialists)
    metrics["method"] = params.merge.method
    metrics["specialists"] = {t: specialists[t] for t in metrics["tasks"] if specialists.get(t) in accuracy}
    items = item_values(results)
    settings = params.eval
    if settings.bootstrap_resamples and items.get("merged"):
        replicates = bootstrap_replicates(items, specialists, resamples=settings.bootstrap_resamples,
                                          seed=settings.bootstrap_seed)
        metrics["intervals"] = {"level": settings.bootstrap_level, "resamples": settings.bootstrap_resamples,
                                "seed": settings.bootstrap_seed, **intervals(replicates, settings.bootstrap_level)}
    return metrics


def item_values(results: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """model -> task -> its per-item scores as the evaluation stored them (``run_lm_eval``)."""
    return {name: {task: entry["values"] for task, entry in (result.get("items") or {}).items()}
            for name, result in results.items() if result.get("items")}


def write_report(params: PipelineParams, inputs: dict[str, Path], folder: Path, store: Path, code: str = "") -> list[str]:
    """Write metrics.json, plots/scores.csv and plots/scores.png into ``folder``."""
    results = json.loads((inputs["evaluate"] / "results.json").read_text())
    metrics = build_metrics(params, results)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (folder / "plots").mkdir()
    ranges = metrics.get("intervals", {}).get("accuracy", {})
    rows = []
    for model, scores in metrics["accuracy"].items():
        for t, score in sorted(scores.items()):
            low, high = ranges.get(model, {}).get(t) or (None, None)
            rows.append({"model": model, "task": t, "accuracy": round(score, 6),
                         "low": None if low is None else round(low, 6), "high": None if high is None else round(high, 6)})
    with open(folder / SCORES_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "task", "accuracy", "low", "high"])
        writer.writeheader()
        writer.writerows(rows)
    vs_specialist_chart(metrics, folder / SCORES_PNG)
    return [METRICS_FILE, SCORES_CSV, SCORES_PNG]


def _interval(metrics: dict, *path: str) -> list[float] | None:
    node: Any = metrics.get("intervals") or {}
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def with_interval(value: float | None, interval: list[float] | None) -> str:
    """``0.912 [0.890, 0.933]``: a number beside its bootstrap interval (``-`` when undefined)."""
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def vs_specialist_rows(metrics: dict) -> list[dict[str, Any]]:
    """One row per task: the merged model's accuracy against the task's specialist's and the
    base's, and the normalized accuracy, each beside its bootstrap interval (a Prefect table)."""
    level = (metrics.get("intervals") or {}).get("level")
    suffix = f" ({level:.0%} interval)" if level else ""
    rows = []
    for task in metrics["tasks"]:
        spec = metrics.get("specialists", {}).get(task)
        row = {"task": task, "specialist model": spec or "-"}
        for label, model in (("merged", "merged"), ("specialist", spec), ("base", "base")):
            value = metrics["accuracy"].get(model, {}).get(task) if model else None
            row[label + suffix] = with_interval(value, _interval(metrics, "accuracy", model or "", task))
        row["normalized" + suffix] = with_interval(metrics["normalized_accuracy"].get(task),
                                                    _interval(metrics, "normalized_accuracy", task))
        rows.append(row)
    return rows


def vs_specialist_chart(metrics: dict, path: Path, title: str | None = None) -> None:
    """A PNG at ``path``: per task, bars of the base, the task's specialist and the merged
    model, with their bootstrap intervals as error bars (when ``metrics`` has intervals); the
    title gives the normalized accuracy and its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = metrics["tasks"]
    specialists = metrics.get("specialists", {})
    series = (("base", lambda t: "base", "#bbbbbb"), ("specialist", lambda t: specialists.get(t), "#4c72b0"),
              ("merged", lambda t: "merged", "#dd8452"))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks)), 4.2))
    for i, (label, model_of, color) in enumerate(series):
        xs, heights, errors = [], [], [[], []]
        for j, task in enumerate(tasks):
            value = metrics["accuracy"].get(model_of(task) or "", {}).get(task)
            if value is None:
                continue
            ranges = _interval(metrics, "accuracy", model_of(task) or "", task) or [value, value]
            xs.append(j + (i - 1) * width)
            heights.append(value)
            errors[0].append(max(value - ranges[0], 0.0))
            errors[1].append(max(ranges[1] - value, 0.0))
        if xs:
            ax.bar(xs, heights, width, yerr=errors, capsize=3, color=color, label=label, error_kw={"linewidth": 1})
    ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    normalized = metrics["normalized_accuracy"].get("mean")
    level = (metrics.get("intervals") or {}).get("level")
    subtitle = f"normalized accuracy {with_interval(normalized, _interval(metrics, 'normalized_accuracy', 'mean'))}" \
        if normalized is not None else ""
    bars = f"; error bars: {level:.0%} paired bootstrap" if level else ""
    ax.set_title(f"{title or metrics['method']}: merged vs specialist per task\n{subtitle}{bars}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png", metadata={"Software": None})
    plt.close(fig)


def format_table(metrics: dict) -> str:
    tasks = metrics["tasks"]
    lines = [f"{'model':16s} " + " ".join(f"{t[:14]:>14s}" for t in tasks) + f" {'mean':>8s}"]
    for model, scores in metrics["accuracy"].items():
        mean = metrics["mean"].get(model)
        lines.append(f"{model:16s} " + " ".join(f"{scores.get(t, float('nan')):14.3f}" for t in tasks) + (f" {mean:8.3f}" if mean is not None else ""))
    n, g = metrics["normalized_accuracy"].get("mean"), metrics["gain_recovery"].get("mean")
    level = (metrics.get("intervals") or {}).get("level")
    note = f" ({level:.0%} paired bootstrap interval)" if level else ""
    if n is not None:
        lines.append(f"normalized accuracy (merged / specialist): "
                     f"{with_interval(n, _interval(metrics, 'normalized_accuracy', 'mean'))}{note}")
    if g is not None:
        lines.append(f"gain recovery ((merged - base) / (specialist - base)): "
                     f"{with_interval(g, _interval(metrics, 'gain_recovery', 'mean'))}{note}")
    return "\n".join(lines)


# --- regressions between two runs -------------------------------------------------------------

def find_regressions(before: dict[str, float], after: dict[str, float], tolerance: float,
                     lower_is_better: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, float, float]]:
    """(task, before, after) for every task both runs scored whose score got worse by more than
    ``tolerance`` (for a lower-is-better metric, a rise is worse)."""
    worse = []
    for task in sorted(set(before) & set(after)):
        drop = after[task] - before[task] if task in lower_is_better else before[task] - after[task]
        if drop > tolerance:
            worse.append((task, before[task], after[task]))
    return worse


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def params_diff(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, before, after) for every leaf that differs (absent: None)."""
    old, new = _flat(before), _flat(after)
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _recipe(run: dict[str, Any]) -> dict[str, Any]:
    """What made a run's merged model: the merge section and the inputs as resolved."""
    return {"merge": run["params"]["merge"], "inputs": run.get("inputs", {}), "model_digest": run.get("model_digest")}


def regression_markdown(regressions: list[tuple[str, float, float]], previous: dict[str, Any], current: dict[str, Any],
                        tolerance: float) -> str:
    """The markdown a regressed run publishes: the tasks, both recipes and what changed between them."""
    when = {"previous": previous, "this run": current}
    lines = [f"# Regression in series {current.get('series')!r}", "",
             f"The merged model's score dropped by more than {tolerance} from the previous run of the series.", "",
             "| task | previous | this run | change |", "|---|---|---|---|"]
    lines += [f"| {task} | {a:.4f} | {b:.4f} | {b - a:+.4f} |" for task, a, b in regressions]
    for title, run in when.items():
        lines += ["", f"## Recipe: {title} (flow run {run.get('flow_run')}, code {(run.get('code') or {}).get('git_commit')})",
                  "", "```json", json.dumps(_recipe(run), indent=2, sort_keys=True), "```"]
    changed = params_diff({"params": previous["params"], "inputs": previous.get("inputs", {})},
                          {"params": current["params"], "inputs": current.get("inputs", {})})
    lines += ["", "## What changed", ""]
    if changed:
        lines += ["| key | previous | this run |", "|---|---|---|"]
        lines += [f"| `{key}` | `{json.dumps(a)}` | `{json.dumps(b)}` |" for key, a, b in changed]
    else:
        lines.append("Nothing in the params or the inputs: the code or the environment changed (see the code versions).")
    return "\n".join(lines) + "\n"
