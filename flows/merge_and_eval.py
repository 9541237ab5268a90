"""The merge-and-eval flow: fetch -> deltas -> decompose -> sparsify -> combine -> save ->
evaluate -> report, every stage a cached task over content-addressed artifacts.

Default parameters come from ``params.yaml`` (the same file DVC reads); ``overrides``
takes dotted keys like ``{"merge.sparsify.singular_matrices_drop_rate": 0.5}``. The flow
returns the metrics (as ``metrics.json``) plus ``artifacts``: the store folder of each stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow

from merging.io.artifacts import replace_dir
from merging.io.writer import temp_sibling
from merging.stages import artifact_is_current, key_for, part_key, partition_groups, write_index
from tasks import combine, decompose, deltas, evaluate, fetch, report, save, sparsify
from tasks.caching import config_for, keyed_dir, run_cached
from tasks.params import load_params


@flow(name="merge-and-eval")
def merge_and_eval(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, refresh: bool = False) -> dict:
    params = load_params(params_file, overrides)
    p = params.model_dump(mode="json")
    store = params.pipeline.artifacts
    fetch_key = fetch.fetch_key(params) or ""
    fetch_out = keyed_dir(store, "fetch", fetch_key) if fetch_key else Path(store) / "store" / "fetch-unpinned"
    fetched = run_cached(fetch.fetch, fetch_key, fetch_out, refresh or not fetch_key, params=p, out_dir=str(fetch_out))
    config = config_for(p, fetched)

    partitions = partition_groups(config, params.pipeline.partitions) if params.pipeline.partitions > 1 else None

    def stage(task, name: str, inputs: dict[str, str], fused: bool = False) -> str:
        key = key_for(name, config, inputs, fused=fused)
        out = keyed_dir(store, "combine-fused" if fused else name, key)
        dirs = {f"{k}_dir": v for k, v in inputs.items() if k != "fetch"}
        if partitions is None or name not in ("decompose", "sparsify", "combine"):
            return run_cached(task, key, out, refresh, params=p, fetch_dir=fetched, out_dir=str(out), **dirs)
        if not refresh and artifact_is_current(out, key):
            return str(out)
        futures = []
        for groups in partitions:  # mapped over the task runner (threads, or Dask workers)
            part = part_key(key, groups)
            part_out = keyed_dir(store, f"{name}-part", part)
            stale = refresh or not artifact_is_current(part_out, part)
            futures.append(task.with_options(refresh_cache=stale).submit(
                params=p, fetch_dir=fetched, out_dir=str(part_out), groups=groups, **dirs))
        return str(write_index(name, config, inputs, [f.result() for f in futures], out))

    produced: dict[str, str] = {}
    if params.pipeline.materialize:
        deltas_dir = stage(deltas.deltas, "deltas", {"fetch": fetched})
        decompose_dir = stage(decompose.decompose, "decompose", {"deltas": deltas_dir})
        sparsify_dir = stage(sparsify.sparsify, "sparsify", {"decompose": decompose_dir, "deltas": deltas_dir})
        combine_dir = stage(combine.combine, "combine", {"sparsify": sparsify_dir, "deltas": deltas_dir})
        produced |= {"deltas": deltas_dir, "decompose": decompose_dir, "sparsify": sparsify_dir}
    else:
        combine_dir = stage(combine.fused_combine, "combine", {"fetch": fetched}, fused=True)
    model_dir = stage(save.save, "save", {"combine": combine_dir})
    produced |= {"combine": combine_dir, "save": model_dir}
    results = evaluate_models(p, fetched, model_dir, store, refresh)
    report_dir = keyed_dir(store, "report", report.report_key(p, results))
    stale = refresh or not (report_dir / "metrics.json").is_file()
    metrics = report.report.with_options(refresh_cache=stale)(p, results, str(report_dir))
    latest = Path(store) / "report"  # the last run's report, where users look first
    staging = temp_sibling(latest)
    shutil.copytree(report_dir, staging)
    replace_dir(staging, latest)
    return metrics | {"artifacts": produced}


def evaluate_models(p: dict, fetch_dir: str, model_dir: str, store: str, refresh: bool) -> dict[str, str]:
    """lm-eval on the merged model, the base and every input; inputs and base are cached by
    their weights' digest, so they are evaluated once across runs and sweeps. With the Dask
    task runner (worker processes) the models are evaluated in parallel; with threads one at
    a time, since lm-eval and accelerate keep process-global state that is not thread-safe."""
    targets = evaluate.eval_targets(p, fetch_dir, model_dir)
    base_folder = targets["base"][0]
    calls = {}
    for name, (folder, digest) in targets.items():
        stale = refresh or not evaluate.result_path(p["eval"], digest, store).is_file()
        calls[name] = (evaluate.evaluate.with_options(refresh_cache=stale), (p["eval"], folder, digest, store, base_folder))
    if p["pipeline"]["task_runner"] == "dask":
        futures = {name: task.submit(*args) for name, (task, args) in calls.items()}
        return {name: future.result() for name, future in futures.items()}
    return {name: task(*args) for name, (task, args) in calls.items()}


def task_runner(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None):
    """The task runner ``pipeline.task_runner`` asks for: a thread pool, or Dask worker
    processes (``pip install 'mergeflow[dask]'``) for parallel evaluation or a cluster."""
    from prefect.task_runners import ThreadPoolTaskRunner

    pipeline = load_params(params_file, overrides).pipeline
    if pipeline.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(cluster_kwargs={"n_workers": pipeline.max_workers, "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=pipeline.max_workers)
