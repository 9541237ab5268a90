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

Every point is validated before the first one runs. Pruning deletes only what this sweep
created and no other run holds a lease on (``merging.io.artifacts.remove_unleased``), so
concurrent runs and sweeps on the store keep their artifacts. Each finished point's metrics
are recorded in ``<store>/sweep-points`` under the key of its full recipe, so a sweep (or a
leaderboard) killed and restarted runs only the points it had not finished.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from evaluation.harness import include_digest
from evaluation.report import with_interval
from flows.merge_and_eval import merge_and_eval, store_of
from merging.bootstrap import bootstrap_replicates, percentile_interval, summary_replicates
from merging.config import read_yaml
from merging.digests import content_key
from merging.errors import ArtifactError, MergeConfigError
from merging.fetch import local_state
from merging.io.artifacts import read_manifest, remove_unleased
from merging.io.writer import atomic_write_text
from merging.pipeline import RECIPE_STATS_PARAMS, pipeline_fingerprint
from merging.pipeline_params import REPLACE, PipelineParams, load_params, require_evaluation

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


def score(metrics: dict, select: str) -> float:
    """The number a point is selected on: ``select`` of the merged model (-inf when undefined)."""
    value = metrics[select]["mean"] if select in ("normalized_accuracy", "gain_recovery") else metrics["mean"]["merged"]
    return float("-inf") if value is None else value


def validation_overrides(params: PipelineParams) -> dict[str, Any]:
    """The overrides that evaluate a point on the validation tasks (none without them): each
    specialist becomes the specialist of its task's validation twin (for normalized accuracy
    and gain recovery)."""
    validation = list(params.eval.validation_tasks)
    if not validation:
        return {}
    twin = dict(zip(params.eval.tasks, validation))
    return {"eval.tasks": validation, "eval.validation_tasks": [], "models.inputs": [
        m.model_dump(mode="json") | ({"task": twin[m.task]} if m.task in twin else {}) for m in params.models.inputs]}


def report_row(params_file: str, params: PipelineParams, override: dict[str, Any], val_metrics: dict, select: str,
               validation: bool, refresh: bool = False) -> dict[str, Any]:
    """A leaderboard row of the point picked for a method: re-run on the test tasks (when it was
    picked on validation) and reported there, with its per-item scores and the bootstrap
    intervals of its numbers (``row_intervals``)."""
    params_override = {k: v for k, v in override.items() if k != "name"}
    test_metrics = run_point(params_file, params_override, f"{label(override)} (test)", refresh)[0] if validation else val_metrics
    inputs = [m.name for m in params.models.inputs]
    return {"method": override["name"], "setting": label(override), "validation": score(val_metrics, select),
            "test_mean": test_metrics["mean"]["merged"],
            "normalized_accuracy": test_metrics["normalized_accuracy"]["mean"],
            "gain_recovery": test_metrics["gain_recovery"]["mean"],
            "best_specialist_mean": _best_specialist_mean(test_metrics, inputs),
            "per_task": test_metrics["accuracy"]["merged"],
            "items": test_metrics.get("items") or {}, "specialists": test_metrics.get("specialists") or {},
            "intervals": row_intervals(test_metrics, params, inputs), "interval_level": params.eval.bootstrap_level}


def bootstrap_stream(zoo_seed: int) -> str:
    """The bootstrap's draw stream of a zoo seed's rows: seeds are resampled independently."""
    return f"zoo-seed-{zoo_seed}"


def row_replicates(items: dict, specialists: dict, inputs: list[str], params: PipelineParams, zoo_seed: int) -> dict:
    """Bootstrap replicates of a row's item-level accuracies (``bootstrap_replicates``) and of its
    numbers (``summary_replicates``, keyed by column), drawn with ``eval.bootstrap_*`` on the zoo
    seed's stream; empty without per-item scores or resamples."""
    if not params.eval.bootstrap_resamples or not items.get("merged"):
        return {}
    replicates = bootstrap_replicates(items, specialists, resamples=params.eval.bootstrap_resamples,
                                      seed=params.eval.bootstrap_seed, stream=bootstrap_stream(zoo_seed))
    return replicates | summary_replicates(replicates, items, inputs)


def row_intervals(metrics: dict, params: PipelineParams, inputs: list[str]) -> dict[str, list[float] | None]:
    """column -> the bootstrap interval of a row's test_mean, normalized_accuracy, gain_recovery
    and margin (what the leaderboard of this zoo seed alone shows too)."""
    replicates = row_replicates(metrics.get("items") or {}, metrics.get("specialists") or {}, inputs, params,
                                params.zoo.seed)
    return {k: percentile_interval(v, params.eval.bootstrap_level) for k, v in replicates.items() if isinstance(k, str)}


@flow(name="sweep")
def sweep(sweep_file: str = "sweep.yaml", params_file: str = "params.yaml", refresh: bool = False) -> list[dict]:
    logger = get_run_logger()
    spec = read_yaml(sweep_file)
    select = spec.get("select", "normalized_accuracy")
    params = require_evaluation(load_params(params_file), params_file)
    validation = list(params.eval.validation_tasks)
    points = expand_grid(spec["grid"])
    logger.info("sweeping %d grid points (%s on %s)", len(points), select, "validation" if validation else "test")
    to_validation = validation_overrides(params)
    runs = []
    for override in points:  # every point validated before the first one runs
        params_override = {k: v for k, v in override.items() if k != "name"}
        on_validation = {**params_override, **to_validation}
        require_evaluation(load_params(params_file, on_validation), f"{params_file} ({label(override)})")
        runs.append((override, on_validation))
    prune = bool(spec.get("prune", False))
    store = store_of(params)
    existing = store_names(store)  # never pruned: not this sweep's
    scored = []
    held: set[str] = set()
    for override, on_validation in runs:
        metrics, computed = run_point(params_file, on_validation, label(override), refresh)
        scored.append((override, metrics))
        if prune and computed:  # points are in grid order (lambda innermost): neighbours share their sparsify artifact
            used = prunable(metrics)
            prune_created(held - used, existing)
            held = used
    prune_created(held, existing)
    best: dict[str, tuple[dict, dict]] = {}
    for override, metrics in scored:
        method = override["name"]
        if method not in best or score(metrics, select) > score(best[method][1], select):
            best[method] = (override, metrics)
    rows = [report_row(params_file, params, override, val_metrics, select, bool(validation), refresh)
            for override, val_metrics in best.values()]
    rows.sort(key=lambda r: -(r["normalized_accuracy"] or r["test_mean"] or 0))
    _publish(rows, Path(params.pipeline.artifacts) / "leaderboard.json")
    return rows


PRUNED = ("sparsify", "combine", "save")
POINTS = "sweep-points"  # <store>/sweep-points/<recipe key>.json: the metrics of finished points


def run_point(params_file: str, overrides: dict[str, Any], name: str, refresh: bool = False) -> tuple[dict, bool]:
    """The metrics of one grid point and whether they were computed now: a merge-and-eval
    subflow, unless a run of the same full recipe finished before (a sweep or leaderboard
    killed and restarted skips its finished points, whose artifacts pruning deleted)."""
    record = point_record(load_params(params_file, overrides))
    if record is not None and record.is_file() and not refresh:
        return json.loads(record.read_text()), False
    metrics = merge_and_eval.with_options(flow_run_name=name)(params_file, overrides, refresh)
    if record is not None:
        atomic_write_text(record, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics, True


def point_record(params: PipelineParams) -> Path | None:
    """Where the metrics of a run of ``params`` are recorded: keyed by the full params, the
    state of the local model files, the eval task files and the code (None when a model may
    change unseen: an unpinned hub source)."""
    models = local_state(params)
    if models is None:
        return None
    key = content_key({"params": params.model_dump(mode="json"), "models": models, "code": pipeline_fingerprint(),
                       "evals": include_digest(params.eval.include_path)})
    return store_of(params) / POINTS / f"{key[:24]}.json"


def store_names(store: Path) -> set[str]:
    """The names in the artifact store now (what a sweep or study must never prune)."""
    return {p.name for p in store.iterdir()} if store.is_dir() else set()


def prunable(metrics: dict) -> set[str]:
    """A point's artifacts that pruning may delete: its sparsify, combine and save, and its
    statistics when they belong to its recipe alone (RegMean++'s Grams: a collect_stats
    artifact keyed by the merge settings)."""
    artifacts = metrics.get("artifacts", {})
    found = {d for stage, d in artifacts.items() if stage in PRUNED}
    stats = artifacts.get("collect_stats")
    if stats and Path(stats).is_dir() and any(k in read_manifest(Path(stats)).get("params", {}) for k in RECIPE_STATS_PARAMS):
        found.add(stats)
    return found


def prune_created(folders: set[str], existing: set[str]) -> None:
    """Delete point artifacts (and the partial artifacts an index lists) that this sweep
    created, unless another run holds a lease on them (``remove_unleased``): a concurrent run
    or sweep keeps what it uses, and what was in the store before the sweep is someone else's.
    A later run that needs a pruned artifact recomputes it (a missing artifact is never
    trusted from the cache)."""
    for folder in map(Path, folders):
        if folder.name in existing or not folder.is_dir():
            continue
        try:
            parts = [(folder / link).resolve() for link in read_manifest(folder).get("parts", [])]
        except ArtifactError:  # incomplete: nothing it lists
            parts = []
        for path in (folder, *parts):
            if path.name not in existing:
                remove_unleased(path)


def _best_specialist_mean(metrics: dict, inputs: list[str]) -> float | None:
    """The highest all-task mean of a single input model (the bar a merge has to clear)."""
    means = [metrics["mean"][name] for name in inputs if name in metrics["mean"]]
    return max(means) if means else None


def format_leaderboard(rows: list[dict]) -> str:
    """The rows as text: each test number beside its paired bootstrap interval."""
    columns = ("test_mean", "normalized_accuracy", "gain_recovery")
    level = next((r["interval_level"] for r in rows if r.get("intervals")), None)
    lines = [f"{'method':16s} {'val':>6s} {'test mean':>21s} {'norm acc':>21s} {'gain rec':>21s}  setting"]
    for r in rows:
        cells = " ".join(f"{with_interval(r[c], (r.get('intervals') or {}).get(c)):>21s}" for c in columns)
        lines.append(f"{r['method']:16s} {r['validation']:6.3f} {cells}  {r['setting']}")
    return "\n".join(lines) + (f"\n[...]: {level:.0%} paired bootstrap interval over the test items" if level else "")


def _table_row(row: dict) -> dict:
    """A row for the Prefect table: its numbers and their intervals, not the per-item scores."""
    out = {k: v for k, v in row.items() if k not in ("per_task", "items", "specialists", "intervals", "interval_level")}
    return out | {f"{k} ({row['interval_level']:.0%} interval)": with_interval(row.get(k), v)
                  for k, v in (row.get("intervals") or {}).items() if k in row}


def _publish(rows: list[dict], path: Path) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    create_table_artifact(key="leaderboard", table=[_table_row(r) for r in rows])
    create_markdown_artifact(key="leaderboard-summary", markdown=f"```\n{format_leaderboard(rows)}\n```")
    get_run_logger().info("\n%s", format_leaderboard(rows))
