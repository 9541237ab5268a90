"""The report stage: ``metrics.json`` (per-task accuracy per model, means, normalized accuracy,
gain recovery), ``plots/scores.csv`` for ``dvc plots`` and a PNG bar chart, in one artifact
folder of the same shape on both routes (``artifacts/report`` under DVC, the store's report
and its latest copy ``<artifacts>/report`` under Prefect)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from merging.metrics import summarize_scores
from merging.pipeline_params import PipelineParams

__all__ = ["write_report", "build_metrics", "format_table", "find_regressions", "params_diff", "regression_markdown",
           "METRICS_FILE", "SCORES_CSV", "SCORES_PNG"]

METRICS_FILE = "metrics.json"
SCORES_CSV = "plots/scores.csv"
SCORES_PNG = "plots/scores.png"


def build_metrics(params: PipelineParams, results: dict[str, dict]) -> dict:
    """metrics.json content from evaluation results (name -> result dict)."""
    accuracy = {name: result["scores"] for name, result in results.items()}
    specialists = {ref.task: ref.name for ref in params.models.inputs if ref.task}
    validation = dict(zip(params.eval.tasks, params.eval.validation_tasks))
    specialists |= {validation[t]: name for t, name in specialists.items() if t in validation}
    metrics = summarize_scores(accuracy, specialists)
    metrics["method"] = params.merge.method
    return metrics


def write_report(params: PipelineParams, inputs: dict[str, Path], folder: Path, store: Path, code: str = "") -> list[str]:
    """Write metrics.json, plots/scores.csv and plots/scores.png into ``folder``."""
    results = json.loads((inputs["evaluate"] / "results.json").read_text())
    metrics = build_metrics(params, results)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (folder / "plots").mkdir()
    rows = [{"model": model, "task": t, "accuracy": round(score, 6)}
            for model, scores in metrics["accuracy"].items() for t, score in sorted(scores.items())]
    with open(folder / SCORES_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "task", "accuracy"])
        writer.writeheader()
        writer.writerows(rows)
    _bar_chart(metrics, folder / SCORES_PNG)
    return [METRICS_FILE, SCORES_CSV, SCORES_PNG]


def _bar_chart(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(metrics["accuracy"])
    tasks = metrics["tasks"]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(tasks)), 4))
    for i, model in enumerate(models):
        ax.bar([j + i * width for j in range(len(tasks))], [metrics["accuracy"][model].get(t, 0) for t in tasks], width, label=model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"per-task accuracy ({metrics['method']})")
    ax.legend(fontsize=8)
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
    if n is not None:
        lines.append(f"normalized accuracy (merged / specialist): {n:.3f}")
    if g is not None:
        lines.append(f"gain recovery ((merged - base) / (specialist - base)): {g:.3f}")
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
