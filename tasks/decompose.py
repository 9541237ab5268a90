"""decompose: the method's decomposition per group (joint SVD for DRM, ...); passthrough when it has none."""

from __future__ import annotations

from prefect import task

from merging import stages as lib
from tasks.caching import config_for, log_artifact, stage_key_fn


@task(name="decompose", cache_key_fn=stage_key_fn("decompose", ("deltas",)), persist_result=True, result_serializer="json")
def decompose(params: dict, fetch_dir: str, deltas_dir: str, out_dir: str,
              groups: list[str] | None = None) -> str:
    return log_artifact("decompose", lib.write_decompose(config_for(params, fetch_dir), deltas_dir, out_dir, groups=groups))
