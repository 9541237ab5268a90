"""The sweep flow: a grid of methods and parameters, each point a ``merge-and-eval``
subflow over the shared content-addressed artifact store (every cached upstream artifact
— fetch, deltas, decompositions, input-model evaluations — is reused), selection on the
validation tasks, the winners re-evaluated on the test tasks, and a leaderboard.

Sweep file (YAML)::

    grid:
      - method: ties                  # optional "name:" tells apart rows of one method (drm_h, drm_v)
        sparsify: {density: [0.2, 0.4]}
        combine: {lambda: [0.5, 1.0]}
      - method: drm
        decompose: {direction: [horizontal, vertical]}
        sparsify: {singular_matrices_drop_rate: [0.5, 0.8]}
    select: normalized_accuracy        # or mean, gain_recovery
    prune: true                        # delete each point's sparsify/combine/save artifacts once
                                       # no later point uses them (the winners are rebuilt for test)
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from flows.merge_and_eval import merge_and_eval
from merging.errors import MergeConfigError
from merging.pipeline_params import REPLACE, load_params

SECTIONS = ("decompose", "sparsify", "combine")


def expand_grid(grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each grid entry -> the list of override dicts it spans: ``merge.method``, the point's
    ``name`` and one ``merge.<section>!`` key per method section. The ``!`` makes each
    section replace params.yaml's (``apply_overrides``): overrides otherwise merge into their
    section, and params.yaml's keys of another method (say TIES' density for a DRM point)
    must not leak into the point."""
    points = []
    for entry in grid:
        if "method" not in entry:
            raise MergeConfigError(f"sweep grid entry {entry} has no 'method'")
        axes = [(section, key, values if isinstance(values, list) else [values])
                for section in SECTIONS for key, values in (entry.get(section) or {}).items()]
        for combo in itertools.product(*(values for _, _, values in axes)):
            override: dict[str, Any] = {"merge.method": entry["method"], "name": entry.get("name", entry["method"])}
            for section in SECTIONS:
                override[_section_key(section)] = {}
            for (section, key, _), value in zip(axes, combo):
                override[_section_key(section)][key] = value
            points.append(override)
    return points


def _section_key(section: str) -> str:
    return f"merge.{section}{REPLACE}"


def label(override: dict[str, Any]) -> str:
    parts = [override.get("name", override["merge.method"])]
    for section in SECTIONS:
        parts += [f"{k}={v}" for k, v in override[_section_key(section)].items()]
    return " ".join(parts)


def _score(metrics: dict, select: str) -> float:
    value = metrics[select]["mean"] if select in ("normalized_accuracy", "gain_recovery") else metrics["mean"]["merged"]
    return float("-inf") if value is None else value


@flow(name="sweep")
def sweep(sweep_file: str = "sweep.yaml", params_file: str = "params.yaml", refresh: bool = False) -> list[dict]:
    logger = get_run_logger()
    spec = yaml.safe_load(Path(sweep_file).read_text())
    select = spec.get("select", "normalized_accuracy")
    params = load_params(params_file)
    validation = list(params.eval.validation_tasks)
    points = expand_grid(spec["grid"])
    logger.info("sweeping %d grid points (%s on %s)", len(points), select, "validation" if validation else "test")
    # on validation, each specialist is the specialist of its task's validation twin (for
    # normalized accuracy and gain recovery)
    twin = dict(zip(params.eval.tasks, validation))
    validation_overrides = {"eval.tasks": validation, "eval.validation_tasks": [], "models.inputs": [
        m.model_dump(mode="json") | ({"task": twin[m.task]} if m.task in twin else {}) for m in params.models.inputs]}
    prune = bool(spec.get("prune", False))
    scored = []
    held: set[str] = set()
    for override in points:
        params_override = {k: v for k, v in override.items() if k != "name"}
        on_validation = {**params_override, **validation_overrides} if validation else params_override
        metrics = merge_and_eval.with_options(flow_run_name=label(override))(params_file, on_validation, refresh)
        scored.append((override, metrics))
        if prune:  # points are in grid order (lambda innermost): neighbours share their sparsify artifact
            used = {d for stage, d in metrics.get("artifacts", {}).items() if stage in PRUNED}
            _remove(held - used)
            held = used
    _remove(held)
    best: dict[str, tuple[dict, dict]] = {}
    for override, metrics in scored:
        method = override["name"]
        if method not in best or _score(metrics, select) > _score(best[method][1], select):
            best[method] = (override, metrics)
    inputs = [m.name for m in params.models.inputs]
    rows = []
    for method, (override, val_metrics) in best.items():
        params_override = {k: v for k, v in override.items() if k != "name"}
        test_metrics = merge_and_eval(params_file, params_override, refresh) if validation else val_metrics
        rows.append({"method": method, "setting": label(override), "validation": _score(val_metrics, select),
                     "test_mean": test_metrics["mean"]["merged"],
                     "normalized_accuracy": test_metrics["normalized_accuracy"]["mean"],
                     "gain_recovery": test_metrics["gain_recovery"]["mean"],
                     "best_specialist_mean": _best_specialist_mean(test_metrics, inputs),
                     "per_task": test_metrics["accuracy"]["merged"]})
    rows.sort(key=lambda r: -(r["normalized_accuracy"] or r["test_mean"] or 0))
    _publish(rows, Path(params.pipeline.artifacts) / "leaderboard.json")
    return rows


PRUNED = ("sparsify", "combine", "save")


def _remove(folders: set[str]) -> None:
    """Delete point artifacts; a later run that needs one recomputes it (a missing artifact is
    never trusted from the cache)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _best_specialist_mean(metrics: dict, inputs: list[str]) -> float | None:
    """The highest all-task mean of a single input model (the bar a merge has to clear)."""
    means = [metrics["mean"][name] for name in inputs if name in metrics["mean"]]
    return max(means) if means else None


def format_leaderboard(rows: list[dict]) -> str:
    lines = [f"{'method':16s} {'val':>6s} {'test mean':>9s} {'norm acc':>9s} {'gain rec':>9s}  setting"]
    for r in rows:
        def f(v):
            return f"{v:9.3f}" if v is not None else f"{'-':>9s}"
        lines.append(f"{r['method']:16s} {r['validation']:6.3f} {f(r['test_mean'])} {f(r['normalized_accuracy'])} {f(r['gain_recovery'])}  {r['setting']}")
    return "\n".join(lines)


def _publish(rows: list[dict], path: Path) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    create_table_artifact(key="leaderboard", table=[{k: v for k, v in r.items() if k != "per_task"} for r in rows])
    create_markdown_artifact(key="leaderboard-summary", markdown=f"```\n{format_leaderboard(rows)}\n```")
    get_run_logger().info("\n%s", format_leaderboard(rows))
