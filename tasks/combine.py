"""combine: merged delta (times lambda) per group; ``fused_combine`` streams every merge stage in memory."""

from __future__ import annotations

from prefect import task

from merging import stages as lib
from tasks.caching import config_for, log_artifact, stage_key_fn


@task(name="combine", cache_key_fn=stage_key_fn("combine", ("sparsify", "deltas")), persist_result=True, result_serializer="json")
def combine(params: dict, fetch_dir: str, sparsify_dir: str, deltas_dir: str, out_dir: str,
            groups: list[str] | None = None) -> str:
    return log_artifact("combine", lib.write_combine(config_for(params, fetch_dir), sparsify_dir, deltas_dir, out_dir, groups=groups))


@task(name="combine-fused", cache_key_fn=stage_key_fn("combine", ("fetch",), fused=True), persist_result=True, result_serializer="json")
def fused_combine(params: dict, fetch_dir: str, out_dir: str) -> str:
    return log_artifact("combine (fused)", lib.write_fused_combine(config_for(params, fetch_dir), out_dir, fetch_dir))
