"""``mergeflow gc``: remove the store's orphaned artifacts.

Keys change whenever params, inputs or code change, so old artifacts are never reused and
never overwritten: they pile up (a nightly adds a merged model a night). ``gc`` keeps what the
current params use (the artifacts a run would reuse, found by walking the stage table with the
same keys), what the last N runs of each series recorded in ``<store>/runs.jsonl`` used (N:
``pipeline.keep_runs``, the retention; runs without a series count as one series) and what
running flows hold a lease on, with the partial artifacts, passthrough targets and cached
per-model scores those reference; everything else goes (an artifact a run leases in the
meantime stays: ``remove_unleased``).
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.harness import cache_file_name
from flows.merge_and_eval import RUNS_LOG, artifact_dir, store_of, walk
from flows.sweep import POINTS
from merging import pipeline
from merging.io.artifacts import is_current, is_leased, linked_folders, remove_unleased
from merging.pipeline_params import PipelineParams

__all__ = ["collect_garbage"]

_KEPT_FOLDERS = ("gguf", "eval-cache", POINTS)


def _current(params: PipelineParams, store: Path) -> set[Path]:
    fused = not params.pipeline.materialize

    def visit(stage: pipeline.Stage, inputs: dict[str, str]) -> Path | None:
        key = pipeline.stage_key(stage.name, params, inputs, fused=fused)
        folder = artifact_dir(store, stage, key)
        return folder if is_current(folder, key) else None

    return {Path(p) for p in walk(params, visit).values()}


def _recent(store: Path, runs: int) -> set[Path]:
    """The artifacts the last ``runs`` recorded runs of each series used."""
    log = store / RUNS_LOG
    records = [json.loads(line) for line in log.read_text().splitlines()] if runs > 0 and log.is_file() else []
    by_series: dict[str | None, list[dict]] = {}
    for record in records:
        by_series.setdefault(record.get("series"), []).append(record)
    return {Path(p) for kept in by_series.values() for record in kept[-runs:] for p in record["artifacts"].values()}


def _scores_of(folder: Path) -> set[str]:
    """Names of the eval-cache files an evaluate artifact's results came from."""
    results = folder / "results.json"
    if not results.is_file():
        return set()
    return {cache_file_name(r["digest"], r["settings"]) for r in json.loads(results.read_text()).values()}


def collect_garbage(params: PipelineParams, keep_runs: int | None = None, dry_run: bool = False) -> list[Path]:
    """Remove (or with ``dry_run`` only list) the store's artifacts nothing keeps; returns
    what was removed (or would be). ``keep_runs`` (default ``pipeline.keep_runs``): how many
    recent runs of each series keep their artifacts."""
    store = store_of(params)
    if not store.is_dir():
        return []
    keep_runs = params.pipeline.keep_runs if keep_runs is None else keep_runs
    keep: set[Path] = set()
    in_use = {p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".") and is_leased(p)}
    for folder in _current(params, store) | _recent(store, keep_runs) | in_use:
        keep |= linked_folders(folder)
    scores = set().union(*(_scores_of(p) for p in keep))
    doomed = [p for p in sorted(store.iterdir())
              if p.is_dir() and p.name not in _KEPT_FOLDERS and not p.name.startswith(".") and p.resolve() not in keep]
    cache = store / "eval-cache"
    if cache.is_dir():
        doomed += [p for p in sorted(cache.glob("*.json")) if p.name not in scores]
    if dry_run:
        return doomed
    removed = []
    for path in doomed:
        if path.is_dir():
            if not remove_unleased(path):
                continue
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
