"""deltas: materialize theta_t - theta_0 for every merged tensor group."""

from __future__ import annotations

from prefect import task

from merging import stages as lib
from tasks.caching import config_for, log_artifact, stage_key_fn


@task(name="deltas", cache_key_fn=stage_key_fn("deltas", ("fetch",)), persist_result=True, result_serializer="json")
def deltas(params: dict, fetch_dir: str, out_dir: str) -> str:
    return log_artifact("deltas", lib.write_deltas(config_for(params, fetch_dir), out_dir, fetch_dir))
