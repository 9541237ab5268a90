"""report: metrics.json (per-task accuracy per model, means, normalized accuracy, gain
recovery), a per-task CSV for ``dvc plots`` and a PNG bar chart, and Prefect artifacts
(a score table and a markdown summary with the recipe) when run inside a flow."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from prefect import task

from merging.metrics import summarize_scores
from tasks.caching import run_logger


def build_metrics(params: dict, results: dict[str, dict]) -> dict:
    """metrics.json content from loaded evaluation results (name -> result dict)."""
    accuracy = {name: result["scores"] for name, result in results.items()}
    specialists = {ref["task"]: ref["name"] for ref in params["models"]["inputs"] if ref.get("task")}
    validation = dict(zip(params["eval"]["tasks"], params["eval"].get("validation_tasks") or ()))
    specialists |= {validation[t]: name for t, name in specialists.items() if t in validation}
    metrics = summarize_scores(accuracy, specialists)
    metrics["method"] = params["merge"]["method"]
    return metrics


def _replace(path: Path, write) -> None:
    """Write through a temporary file and rename: an earlier version (perhaps a hardlink into
    the DVC cache) is replaced, never rewritten in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_report(params: dict, results: dict[str, dict], out_dir: str, metrics_file: str | None = None) -> dict:
    """Write metrics.json, plots/scores.csv and plots/scores.png under ``out_dir``."""
    out = Path(out_dir)
    metrics = build_metrics(params, results)
    text = json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    _replace(out / "metrics.json", lambda p: p.write_text(text))
    if metrics_file:
        _replace(Path(metrics_file), lambda p: p.write_text(text))
    rows = [{"model": model, "task": t, "accuracy": round(score, 6)} for model, scores in metrics["accuracy"].items() for t, score in sorted(scores.items())]

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["model", "task", "accuracy"])
            writer.writeheader()
            writer.writerows(rows)

    _replace(out / "plots" / "scores.csv", write_csv)
    _replace(out / "plots" / "scores.png", lambda p: _bar_chart(metrics, p))
    return metrics


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
    fig.savefig(path, dpi=100, format="png")
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


def report_key(params: dict, results: dict[str, str]) -> str:
    """Content key of a report: the params plus the evaluation results it summarizes."""
    import hashlib

    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for name, path in sorted(results.items()):
        h.update(name.encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def _key(context, parameters) -> str:
    return "report-" + report_key(parameters["params"], parameters["results"]) + parameters["out_dir"]


@task(name="report", cache_key_fn=_key, persist_result=True, result_serializer="json")
def report(params: dict, results: dict[str, str], out_dir: str) -> dict:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    loaded = {name: json.loads(Path(path).read_text()) for name, path in results.items()}
    metrics = write_report(params, loaded, out_dir)
    table = [{"model": m, **{t: round(v, 4) for t, v in s.items()}} for m, s in metrics["accuracy"].items()]
    create_table_artifact(table=table, key="merge-scores", description=f"per-task accuracy, {metrics['method']}")
    recipe = json.dumps(params["merge"], indent=2)
    create_markdown_artifact(
        key="merge-summary",
        markdown=f"# {metrics['method']} merge\n\n```\n{format_table(metrics)}\n```\n\n## Recipe\n\n```json\n{recipe}\n```\n",
    )
    run_logger().info("\n%s", format_table(metrics))
    return metrics
