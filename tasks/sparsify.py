"""sparsify: trim / drop / prune and sign election per group; passthrough when the method has none."""

from __future__ import annotations

from prefect import task

from merging import stages as lib
from tasks.caching import config_for, log_artifact, stage_key_fn


@task(name="sparsify", cache_key_fn=stage_key_fn("sparsify", ("decompose", "deltas")), persist_result=True, result_serializer="json")
def sparsify(params: dict, fetch_dir: str, decompose_dir: str, deltas_dir: str, out_dir: str,
             groups: list[str] | None = None) -> str:
    return log_artifact("sparsify", lib.write_sparsify(config_for(params, fetch_dir), decompose_dir, deltas_dir, out_dir, groups=groups))
