"""The merge-and-eval flow: the stage table run as cached Prefect tasks over a
content-addressed store (``<pipeline.artifacts>/store/<stage>-<key>``).

Default parameters come from ``params.yaml`` (the same file DVC reads); ``overrides`` takes
dotted keys like ``{"merge.sparsify.singular_matrices_drop_rate": 0.5}`` or nested mappings like
``{"eval": {"limit": 10}}``, merged into their section (``merging.pipeline_params.apply_overrides``);
params with nothing to evaluate are refused before any stage runs. The flow returns the
metrics (as ``metrics.json``) plus ``artifacts``: the store folder of each stage, and ``items``:
each model's per-item scores per task (what a leaderboard's bootstrap over seeds resamples). The
last run's report is copied to ``<pipeline.artifacts>/report``, where users look first; the UI
gets the score table (``merge-scores``), each task's merged score against its specialist's with
their bootstrap intervals (``merge-vs-specialist``) and a summary.

At the start of a run, hub inputs on a branch (or with no revision) are pinned to the commit the
branch points at now, so a new upload is merged and an unchanged input is a cache hit all the
way down. Every run is recorded in ``<store>/runs.jsonl``: its params, artifacts, inputs as
resolved (commit, digest), the merged model's digest and scores, and the code version. A run of
a ``series`` (the deployments pass their name) compares its scores with the previous run of the
series: a drop beyond ``eval.regression_tolerance`` on any task ends it Failed, with a markdown
artifact naming the tasks, both recipes and what changed. ``retry.flow`` (retries, timeout)
applies to the run whichever way it was started.

Runs in several processes may share a store: a run holds a lease on every artifact it uses
(from before its stage runs until the flow ends), so pruning and ``mergeflow gc`` leave them
alone; ``runs.jsonl`` appends and the report copy happen under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Failed
from prefect.utilities.timeout import timeout

from evaluation.harness import RESULTS_FILE, lower_is_better
from evaluation.report import find_regressions, item_values, regression_markdown
from merging import pipeline
from merging.errors import MergeConfigError
from merging.fetch import fetched_models
from merging.io.artifacts import exclusive, lease
from merging.io.sources import is_local_ref, resolve_source
from merging.io.writer import commit_dir, temp_sibling
from merging.pipeline_params import PipelineParams, Retry, load_params, require_evaluation
from tasks.stage import is_transient, stage_task

__all__ = ["merge_and_eval", "run_pipeline", "record_run", "walk", "artifact_dir", "task_runner", "store_of", "pin_inputs",
           "last_run", "code_version", "RUNS_LOG"]

RUNS_LOG = "runs.jsonl"
_COMMIT = re.compile(r"[0-9a-f]{40}")


def store_of(params: PipelineParams) -> Path:
    return Path(params.pipeline.artifacts) / "store"


@flow(name="merge-and-eval")
def merge_and_eval(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, refresh: bool = False,
                   series: str | None = None) -> dict:
    params = require_evaluation(load_params(params_file, overrides), params_file)
    with _flow_retry(params.retry.flow):
        params = pin_inputs(params)
        previous = last_run(store_of(params), series) if series else None
        with contextlib.ExitStack() as leases:
            produced = run_pipeline(params, refresh, leases)
            current = record_run(params, produced, series)
            report = Path(produced["report"])
            metrics = json.loads((report / "metrics.json").read_text())
            _publish(params, report, metrics)
    if previous is not None:
        worse = find_regressions(previous["scores"], current["scores"], params.eval.regression_tolerance,
                                 set(current["lower_is_better"]))
        if worse:
            return _regressed(worse, previous, current, params.eval.regression_tolerance)
    results = json.loads((Path(produced["evaluate"]) / RESULTS_FILE).read_text())
    return metrics | {"artifacts": produced, "items": item_values(results)}


def walk(params: PipelineParams, visit) -> dict[str, str]:
    """Visit the stages a run of ``params`` executes, in table order, with their inputs;
    ``visit(stage, inputs)`` returns the stage's artifact folder, or None to stop."""
    fused = not params.pipeline.materialize
    produced: dict[str, str] = {}
    for stage in pipeline.STAGES:
        if fused and stage.fusable:
            continue  # runs in memory inside the next stage
        folder = visit(stage, {n: produced[n] for n in pipeline.stage_inputs(stage, fused)})
        if folder is None:
            break
        produced[stage.name] = str(folder)
    return produced


def artifact_dir(store: Path, stage: pipeline.Stage, key: str, part: bool = False) -> Path:
    return store / f"{stage.name}{'-part' if part else ''}-{key[:16]}"


def run_pipeline(params: PipelineParams, refresh: bool = False, leases: contextlib.ExitStack | None = None) -> dict[str, str]:
    """Every stage of the table as a cached task; returns stage name -> artifact folder. The
    leases on the artifacts go into ``leases`` (the caller releases them when done with the
    artifacts; default: on return)."""
    store = store_of(params)
    fused = not params.pipeline.materialize
    with contextlib.ExitStack() as own:
        held = own if leases is None else leases

        def visit(stage: pipeline.Stage, inputs: dict[str, str]) -> str:
            if stage.partitioned and params.pipeline.partitions > 1:
                return _run_partitioned(stage, params, inputs, store, fused, refresh, held)
            return _run(stage, params, inputs, store, fused, refresh, held)

        return walk(params, visit)


def record_run(params: PipelineParams, produced: dict[str, str], series: str | None = None) -> dict[str, Any]:
    """Append the run to ``<store>/runs.jsonl`` (what ``mergeflow gc``, regressions and ``mergeflow
    lineage`` read): params, artifacts, inputs as fetch resolved them, the merged model's digest and
    scores, the code version. Returns the record."""
    from prefect.runtime import flow_run

    merged = json.loads((Path(produced["evaluate"]) / RESULTS_FILE).read_text())["merged"]
    inputs = {name: {k: m.get(k) for k in ("source", "revision", "commit", "digest")}
              for name, m in fetched_models(produced["fetch"]).items()}
    record = {"time": time.time(), "series": series, "flow_run": flow_run.id, "params": params.model_dump(mode="json"),
              "artifacts": produced, "inputs": inputs, "model_digest": merged["digest"], "scores": merged["scores"],
              "lower_is_better": sorted(lower_is_better(merged)), "code": code_version()}
    with open(store_of(params) / RUNS_LOG, "a") as log:
        fcntl.flock(log, fcntl.LOCK_EX)  # released at close, after the flush: whole lines, however long
        log.write(json.dumps(record, sort_keys=True) + "\n")
    return record


def last_run(store: Path, series: str) -> dict[str, Any] | None:
    """The last run of ``series`` recorded in ``<store>/runs.jsonl`` (None: none yet)."""
    log = store / RUNS_LOG
    lines = log.read_text().splitlines() if log.is_file() else []
    return next((r for r in map(json.loads, reversed(lines)) if r.get("series") == series and "scores" in r), None)


def code_version() -> dict[str, Any]:
    """The code a run used: mergeflow's version, the stages' code fingerprint and, when mergeflow
    runs from a git checkout, its commit (``git_dirty``: tracked files differ from it)."""
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[1]
    commit = dirty = None
    if _git(root, "rev-parse", "--show-toplevel") == str(root):  # this checkout, not a repo around a venv
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    return {"mergeflow": version("mergeflow"), "fingerprint": pipeline.pipeline_fingerprint(), "git_commit": commit,
            "git_dirty": dirty}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@task(name="resolve-inputs")
def _resolve_commits(refs: dict[str, tuple[str, str | None]]) -> dict[str, str]:
    """name -> the commit a hub model's branch (or default branch) points at now."""
    commits = {}
    for name, (source, revision) in refs.items():
        _, commit = resolve_source(source, revision)
        commits[name] = commit
    get_run_logger().info("hub inputs at %s", commits)
    return commits


def pin_inputs(params: PipelineParams) -> PipelineParams:
    """``params`` with every hub model whose revision can move (a branch, a tag, none) pinned to its
    commit now (retried like fetch). Local inputs need nothing: fetch keys them on their files
    and records their digest."""
    refs = [params.models.base, *params.models.inputs]
    movable = {r.name: (r.source, r.revision) for r in refs
               if not is_local_ref(r.source) and not _COMMIT.fullmatch(r.revision or r.source.partition("@")[2])}
    if not movable:
        return params
    retry = params.retry.fetch
    commits = _resolve_commits.with_options(retries=retry.retries, retry_delay_seconds=retry.delay_seconds,
                                            timeout_seconds=retry.timeout_seconds, retry_condition_fn=is_transient)(movable)
    raw = params.model_dump(mode="json")
    for ref in [raw["models"]["base"], *raw["models"]["inputs"]]:
        if ref["name"] in commits:
            ref["revision"] = commits[ref["name"]]
    return PipelineParams.model_validate(raw)


@contextlib.contextmanager
def _flow_retry(retry: Retry) -> Iterator[None]:
    """``retry.flow`` for this flow run. Prefect's server decides whether a failed flow run is
    retried, from the run's policy, so the policy is set here as soon as the params are read: the
    same for ``mergeflow run``, served and worker deployments and subflows. A ``MergeConfigError``
    fails the same way every time and is not retried; the timeout covers the rest of the run."""
    _set_run_retries(retry.retries, retry.delay_seconds)
    try:
        with timeout(retry.timeout_seconds):
            yield
    except MergeConfigError:
        _set_run_retries(0, 0)
        raise


def _set_run_retries(retries: int, delay: float) -> None:
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        policy = client.read_flow_run(context.flow_run.id).empirical_policy
        client.update_flow_run(context.flow_run.id, empirical_policy=policy.model_copy(
            update={"retries": retries, "retry_delay": int(delay)}))


def _regressed(worse: list[tuple[str, float, float]], previous: dict, current: dict, tolerance: float):
    """The Failed state of a run whose scores dropped (a regression is not retried), with its markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key="merge-regression", markdown=regression_markdown(worse, previous, current, tolerance),
                             description=f"scores dropped in series {current['series']!r}")
    _set_run_retries(0, 0)
    drops = ", ".join(f"{t} {a:.4f} -> {b:.4f}" for t, a, b in worse)
    return Failed(message=f"regression in series {current['series']!r} beyond tolerance {tolerance}: {drops}")


def _run(stage: pipeline.Stage, params: PipelineParams, inputs: dict[str, str], store: Path, fused: bool,
         refresh: bool, leases: contextlib.ExitStack, groups: list[str] | None = None, submit: bool = False):
    key = pipeline.stage_key(stage.name, params, inputs, fused=fused, groups=groups)
    out = artifact_dir(store, stage, key, part=groups is not None)
    leases.enter_context(lease(out))  # before the cache lookup: nothing removes it from here on
    task = stage_task(stage, store, getattr(params.retry, stage.name, None)).with_options(refresh_cache=refresh or None)
    call = task.submit if submit else task
    return call(stage=stage.name, params=params.model_dump(mode="json"), inputs=inputs, out_dir=str(out),
                store=str(store), key=key, fused=fused, groups=groups, force=refresh)


def _run_partitioned(stage: pipeline.Stage, params: PipelineParams, inputs: dict[str, str], store: Path, fused: bool,
                     refresh: bool, leases: contextlib.ExitStack) -> str:
    """The stage mapped over tensor-group partitions (task runner: threads or Dask), joined by
    an index artifact."""
    partitions = pipeline.partition_groups(params, inputs["fetch"], params.pipeline.partitions, inputs.get("collect_stats"))
    key = pipeline.stage_key(stage.name, params, inputs, fused=fused)
    index = artifact_dir(store, stage, key)
    leases.enter_context(lease(index))
    futures = [_run(stage, params, inputs, store, fused, refresh, leases, groups, submit=True) for groups in partitions]
    parts = [f.result() for f in futures]
    return str(pipeline.write_index(stage.name, params, inputs, parts, index, fused=fused))


def _publish(params: PipelineParams, report: Path, metrics: dict) -> None:
    """The score table and a markdown summary in the Prefect UI; the report as the latest one."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from evaluation.report import format_table, vs_specialist_rows

    table = [{"model": m, **{t: round(v, 4) for t, v in s.items()}} for m, s in metrics["accuracy"].items()]
    create_table_artifact(table=table, key="merge-scores", description=f"per-task accuracy, {metrics['method']}")
    create_table_artifact(table=vs_specialist_rows(metrics), key="merge-vs-specialist",
                          description=f"{metrics['method']}: each task's merged score against its specialist's, with "
                                      "paired bootstrap intervals")
    recipe = json.dumps(params.merge.model_dump(mode="json"), indent=2)
    create_markdown_artifact(key="merge-summary", markdown=f"# {metrics['method']} merge\n\n```\n{format_table(metrics)}\n```"
                                                           f"\n\n## Recipe\n\n```json\n{recipe}\n```\n")
    get_run_logger().info("\n%s", format_table(metrics))
    latest = Path(params.pipeline.artifacts).absolute() / "report"
    with exclusive(latest):  # concurrent runs replace it one at a time: the last one's stays
        staging = temp_sibling(latest)
        try:
            shutil.copytree(report, staging)
            commit_dir(staging, latest, overwrite=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def task_runner(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None):
    """The task runner ``pipeline.task_runner`` asks for: a thread pool, or Dask (``pip install
    'mergeflow[dask]'``): the cluster at ``pipeline.dask_address``, else a local cluster of
    ``max_workers`` worker processes, for partitions on several processes or machines."""
    from prefect.task_runners import ThreadPoolTaskRunner

    settings = load_params(params_file, overrides).pipeline
    if settings.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise MergeConfigError("pipeline.task_runner: dask needs prefect-dask: pip install 'mergeflow[dask]'") from None
        if settings.dask_address:
            return DaskTaskRunner(address=settings.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": settings.max_workers, "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=settings.max_workers)
