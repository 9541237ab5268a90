"""One Prefect task for every stage of the table.

The task's cache policy is keyed on the stage key (which already covers the params the stage
reads, its input artifacts and its code) plus the artifact folder. Its cache records live in
the store (``<store>/.prefect-cache``) and are checked against it: when the folder does not
hold a complete artifact of that key, the record is dropped before Prefect looks it up. A
cache hit therefore always points at a real artifact (the UI shows reused stages as Cached),
and a deleted or stale artifact is simply recomputed. The cached value is the artifact's path.

Runs in several processes may share a store: each task runs as a serializable transaction
whose lock (``StoreLocks``) is an flock(2) lock on a file beside the records. A second run of
the same stage and folder waits for the first, then reads its record (Cached), so a shared
artifact is computed once and a record is never read while another run writes it.

Retries and timeouts are params.yaml's ``retry`` section, given only to the stages whose failures
can be transient (fetch: downloads; evaluate: lm-eval runs); a ``MergeConfigError`` is never retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
from prefect import Task, get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.locking.protocol import LockManager
from prefect.transactions import IsolationLevel

from merging import pipeline
from merging.digests import content_key
from merging.errors import MergeConfigError
from merging.io.artifacts import acquire_lock, is_current, release_lock
from merging.pipeline_params import PipelineParams, Retry

__all__ = ["StoreCachePolicy", "StoreLocks", "stage_task", "run_stage_task", "is_transient", "CACHE_RECORDS"]

CACHE_RECORDS = ".prefect-cache"


@dataclass
class StoreCachePolicy(CachePolicy):
    """Cache key = (stage key, artifact folder); a record whose artifact is gone is dropped."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        key = f"{inputs['stage']}-{content_key([inputs['key'], str(Path(inputs['out_dir']).resolve())])}"
        if not is_current(inputs["out_dir"], inputs["key"]):
            (Path(self.key_storage) / key).unlink(missing_ok=True)
        return key


class StoreLocks(LockManager):
    """Prefect's transaction locks as flock(2) locks on ``<folder>/<key>.writer``. Unlike
    Prefect's file lock manager, a lock dies with its process (no stale lock file blocks the
    next run) and taking one is atomic. Holds the descriptors of this process's locks."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._held: dict[str, tuple[str, int]] = {}  # key -> (holder, descriptor)

    def __reduce__(self):  # a Dask worker gets a manager of its own, holding nothing
        return (StoreLocks, (self.folder,))

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.writer"

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        if self.is_lock_holder(key, holder):
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = acquire_lock(self._path(key), timeout=acquire_timeout)
        if fd is None:
            return False
        self._held[key] = (holder, fd)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(partial(self.acquire_lock, key, holder, acquire_timeout, hold_timeout))

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"cannot release the lock of record {key}: {holder} does not hold it")
        _, fd = self._held.pop(key)
        release_lock(fd, self._path(key))

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        if not self._path(key).exists():
            return False
        fd = acquire_lock(self._path(key), timeout=0)
        if fd is None:
            return True
        release_lock(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self._held.get(key, (None,))[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        if not self._path(key).exists():
            return True
        fd = acquire_lock(self._path(key), shared=True, timeout=timeout)
        if fd is None:
            return False
        release_lock(fd)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(partial(self.wait_for_lock, key, timeout))


@task(name="stage", persist_result=True, result_serializer="json")
def run_stage_task(stage: str, params: dict, inputs: dict[str, str], out_dir: str, store: str, key: str,
                   fused: bool = False, groups: list[str] | None = None, force: bool = False) -> str:
    """Run one stage (``merging.pipeline.run_stage``) and return its artifact folder."""
    path = pipeline.run_stage(stage, PipelineParams.model_validate(params), inputs, out_dir, store,
                              fused=fused, groups=groups, force=force)
    get_run_logger().info("%s -> %s", stage, path)
    return str(path)


def is_transient(task: Task, task_run, state) -> bool:
    """Whether a failed attempt may succeed when retried (Prefect's ``retry_condition_fn``): not
    when the params are wrong (``MergeConfigError``: the same failure every time)."""
    return not isinstance(state.result(raise_on_failure=False), MergeConfigError)


def stage_task(stage: pipeline.Stage, store: str | Path, retry: Retry | None = None) -> Task:
    """The task of one stage: named after it, cached in ``store``; ``retry`` (params.yaml's
    ``retry.<stage>``, only for stages whose failures can be transient) sets its retries and timeout."""
    records = Path(store).resolve() / CACHE_RECORDS
    policy = StoreCachePolicy(key_storage=records, isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=StoreLocks(records))
    retry = retry or Retry()
    return run_stage_task.with_options(name=stage.name, cache_policy=policy, retries=retry.retries,
                                       retry_delay_seconds=retry.delay_seconds, timeout_seconds=retry.timeout_seconds,
                                       retry_condition_fn=is_transient)
