"""One Prefect task for every stage of the table.

The task's cache policy is keyed on the stage key (which already covers the params the stage
reads, its input artifacts and its code) plus the artifact folder. Its cache records live in
the store (``<store>/.prefect-cache``) and are checked against it: when the folder does not
hold a complete artifact of that key, the record is dropped before Prefect looks it up. A
cache hit therefore always points at a real artifact (the UI shows reused stages as Cached),
and a deleted or stale artifact is simply recomputed. The cached value is the artifact's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import CachePolicy

from merging import pipeline
from merging.digests import content_key
from merging.io.artifacts import is_current
from merging.pipeline_params import PipelineParams

__all__ = ["StoreCachePolicy", "stage_task", "run_stage_task", "CACHE_RECORDS"]

CACHE_RECORDS = ".prefect-cache"


@dataclass
class StoreCachePolicy(CachePolicy):
    """Cache key = (stage key, artifact folder); a record whose artifact is gone is dropped."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        key = f"{inputs['stage']}-{content_key([inputs['key'], str(Path(inputs['out_dir']).resolve())])}"
        if not is_current(inputs["out_dir"], inputs["key"]):
            (Path(self.key_storage) / key).unlink(missing_ok=True)
        return key


@task(name="stage", persist_result=True, result_serializer="json")
def run_stage_task(stage: str, params: dict, inputs: dict[str, str], out_dir: str, store: str, key: str,
                   fused: bool = False, groups: list[str] | None = None, force: bool = False) -> str:
    """Run one stage (``merging.pipeline.run_stage``) and return its artifact folder."""
    path = pipeline.run_stage(stage, PipelineParams.model_validate(params), inputs, out_dir, store,
                              fused=fused, groups=groups, force=force)
    get_run_logger().info("%s -> %s", stage, path)
    return str(path)


def stage_task(stage: pipeline.Stage, store: str | Path) -> Task:
    """The task of one stage: named after it, cached in ``store``, retried where failures are transient."""
    policy = StoreCachePolicy(key_storage=Path(store).resolve() / CACHE_RECORDS)
    return run_stage_task.with_options(name=stage.name, retries=stage.retries, retry_delay_seconds=5, cache_policy=policy)
