"""Partitioned stages on a real dask.distributed cluster: ``pipeline.task_runner: dask`` with
``pipeline.dask_address`` pointing at a 2-worker ``LocalCluster`` of processes gives the model
a single process gives, byte for byte, with stages run by both worker processes."""

from __future__ import annotations

import pytest

from tests.pipeline_helpers import write_params


def _finished_tasks(scheduler):
    """A scheduler plugin counting the tasks each worker finished (``by_worker``)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class FinishedTasks(SchedulerPlugin):
        name = "finished-tasks"

        def __init__(self) -> None:
            self.by_worker: dict[str, int] = {}

        def transition(self, key, start, finish, *args, **kwargs) -> None:
            task = scheduler.tasks.get(key)
            if finish == "memory" and task is not None:
                for worker in task.who_has or ():
                    self.by_worker[worker.address] = self.by_worker.get(worker.address, 0) + 1

    return FinishedTasks()


def test_partitions_on_a_two_process_dask_cluster_give_the_same_model(prefect_harness, tiny_models, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from prefect.settings import PREFECT_API_URL

    from flows.merge_and_eval import merge_and_eval, task_runner
    from merging.pipeline import merge_checkpoints
    from merging.pipeline_params import load_params, merge_config

    # the workers are new processes: they reach the test's Prefect server through the environment
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    params = str(write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art", method="drm",
                              sparsify={"singular_matrices_drop_rate": 0.6}))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        overrides = {"pipeline.task_runner": "dask", "pipeline.dask_address": cluster.scheduler_address,
                     "pipeline.partitions": 2, "eval.tasks": ["demo_arith"]}
        runner = task_runner(params, overrides)
        assert runner.address == cluster.scheduler_address
        finished = _finished_tasks(cluster.scheduler)
        cluster.scheduler.add_plugin(finished)
        merge_and_eval.with_options(task_runner=runner)(params, overrides)
    assert len(finished.by_worker) == 2, finished.by_worker  # both worker processes ran stages
    assert sum(finished.by_worker.values()) >= 6  # 2 partitions x decompose, sparsify, combine (and more)  # 2 partitions x decompose/sparsify/combine (and more) ran on the cluster
    store = tmp_path / "art" / "store"
    assert len(list(store.glob("combine-part-*"))) == 2
    # one process, in memory: the weights mergeflow merge writes (equal to an unpartitioned pipeline run,
    # tests/merging/test_pipeline.py)
    whole = merge_checkpoints(merge_config(load_params(params)), tmp_path / "one")
    (split,) = list(store.glob("save-*"))
    assert (split / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
