"""save: base + merged delta, cast once, as a Hugging Face folder with config, tokenizer and model card."""

from __future__ import annotations

from prefect import task

from merging import stages as lib
from tasks.caching import config_for, log_artifact, stage_key_fn


@task(name="save", cache_key_fn=stage_key_fn("save", ("combine",)), persist_result=True, result_serializer="json")
def save(params: dict, fetch_dir: str, combine_dir: str, out_dir: str) -> str:
    return log_artifact("save", lib.write_model(config_for(params, fetch_dir), combine_dir, out_dir))
