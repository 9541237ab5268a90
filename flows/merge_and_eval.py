"""The merge-and-eval flow: the stage table run as cached Prefect tasks over a
content-addressed store (``<pipeline.artifacts>/store/<stage>-<key>``).

Default parameters come from ``params.yaml`` (the same file DVC reads); ``overrides`` takes
dotted keys like ``{"merge.sparsify.singular_matrices_drop_rate": 0.5}`` or nested mappings like
``{"eval": {"limit": 10}}``, merged into their section (``merging.pipeline_params.apply_overrides``);
params with nothing to evaluate are refused before any stage runs. The flow returns the
metrics (as ``metrics.json``) plus ``artifacts``: the store folder of each stage. The last
run's report is copied to ``<pipeline.artifacts>/report``, where users look first.

Runs in several processes may share a store: a run holds a lease on every artifact it uses
(from before its stage runs until the flow ends), so pruning and ``mergeflow gc`` leave them
alone; ``runs.jsonl`` appends and the report copy happen under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from merging import pipeline
from merging.io.artifacts import exclusive, lease
from merging.io.writer import commit_dir, temp_sibling
from merging.pipeline_params import PipelineParams, load_params, require_evaluation
from tasks.stage import stage_task

__all__ = ["merge_and_eval", "run_pipeline", "walk", "artifact_dir", "task_runner", "store_of", "RUNS_LOG"]

RUNS_LOG = "runs.jsonl"


def store_of(params: PipelineParams) -> Path:
    return Path(params.pipeline.artifacts) / "store"


@flow(name="merge-and-eval")
def merge_and_eval(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, refresh: bool = False) -> dict:
    params = require_evaluation(load_params(params_file, overrides), params_file)
    with contextlib.ExitStack() as leases:
        produced = run_pipeline(params, refresh, leases)
        report = Path(produced["report"])
        metrics = json.loads((report / "metrics.json").read_text())
        _publish(params, report, metrics)
    return metrics | {"artifacts": produced}


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
    """Every stage of the table as a cached task; returns stage name -> artifact folder and
    records the run in ``<store>/runs.jsonl`` (what ``mergeflow gc`` keeps). The leases on the
    artifacts go into ``leases`` (the caller releases them when done with the artifacts;
    default: on return)."""
    store = store_of(params)
    fused = not params.pipeline.materialize
    with contextlib.ExitStack() as own:
        held = own if leases is None else leases

        def visit(stage: pipeline.Stage, inputs: dict[str, str]) -> str:
            if stage.partitioned and params.pipeline.partitions > 1:
                return _run_partitioned(stage, params, inputs, store, fused, refresh, held)
            return _run(stage, params, inputs, store, fused, refresh, held)

        produced = walk(params, visit)
    record = {"time": time.time(), "params": params.model_dump(mode="json"), "artifacts": produced}
    with open(store / RUNS_LOG, "a") as log:
        fcntl.flock(log, fcntl.LOCK_EX)  # released at close, after the flush: whole lines, however long
        log.write(json.dumps(record, sort_keys=True) + "\n")
    return produced


def _run(stage: pipeline.Stage, params: PipelineParams, inputs: dict[str, str], store: Path, fused: bool,
         refresh: bool, leases: contextlib.ExitStack, groups: list[str] | None = None, submit: bool = False):
    key = pipeline.stage_key(stage.name, params, inputs, fused=fused, groups=groups)
    out = artifact_dir(store, stage, key, part=groups is not None)
    leases.enter_context(lease(out))  # before the cache lookup: nothing removes it from here on
    task = stage_task(stage, store).with_options(refresh_cache=refresh or None)
    call = task.submit if submit else task
    return call(stage=stage.name, params=params.model_dump(mode="json"), inputs=inputs, out_dir=str(out),
                store=str(store), key=key, fused=fused, groups=groups, force=refresh)


def _run_partitioned(stage: pipeline.Stage, params: PipelineParams, inputs: dict[str, str], store: Path, fused: bool,
                     refresh: bool, leases: contextlib.ExitStack) -> str:
    """The stage mapped over tensor-group partitions (task runner: threads or Dask), joined by
    an index artifact."""
    partitions = pipeline.partition_groups(params, inputs["fetch"], params.pipeline.partitions)
    key = pipeline.stage_key(stage.name, params, inputs, fused=fused)
    index = artifact_dir(store, stage, key)
    leases.enter_context(lease(index))
    futures = [_run(stage, params, inputs, store, fused, refresh, leases, groups, submit=True) for groups in partitions]
    parts = [f.result() for f in futures]
    return str(pipeline.write_index(stage.name, params, inputs, parts, index, fused=fused))


def _publish(params: PipelineParams, report: Path, metrics: dict) -> None:
    """The score table and a markdown summary in the Prefect UI; the report as the latest one."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from evaluation.report import format_table

    table = [{"model": m, **{t: round(v, 4) for t, v in s.items()}} for m, s in metrics["accuracy"].items()]
    create_table_artifact(table=table, key="merge-scores", description=f"per-task accuracy, {metrics['method']}")
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
    """The task runner ``pipeline.task_runner`` asks for: a thread pool, or Dask worker
    processes (``pip install 'mergeflow[dask]'``) for partitions on several processes or a cluster."""
    from prefect.task_runners import ThreadPoolTaskRunner

    settings = load_params(params_file, overrides).pipeline
    if settings.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(cluster_kwargs={"n_workers": settings.max_workers, "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=settings.max_workers)
