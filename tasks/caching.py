"""Cache keys and artifact locations shared by every stage task.

A stage's key is ``merging.stages.stage_key`` over the params it reads and the output
digests of its inputs (never pickled tensors). In a Prefect run the artifact lives at
``<store>/<stage>-<key[:16]>`` (content-addressed, so concurrent runs and sweeps share it
safely); under DVC at the fixed ``artifacts/<stage>``. A cached Prefect result whose
artifact is gone or stale is recomputed (``refresh_cache``), never trusted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import Task

from merging.stages import artifact_is_current

__all__ = ["store_dir", "keyed_dir", "run_cached", "config_for", "stage_key_fn", "log_artifact"]


def store_dir(artifacts: str) -> Path:
    return Path(artifacts) / "store"


def keyed_dir(artifacts: str, stage: str, key: str) -> Path:
    return store_dir(artifacts) / f"{stage}-{key[:16]}"


def run_cached(task: Task, key: str, out: Path, refresh: bool, **kwargs: Any):
    """Call ``task``, recomputing if asked or if its artifact is missing or stale."""
    stale = refresh or not artifact_is_current(out, key)
    return task.with_options(refresh_cache=stale)(**kwargs)


def config_for(params: dict, fetch_dir: str):
    """The library merge config for the params dict, with the folders ``fetch`` resolved."""
    from tasks.fetch import fetched_folders
    from tasks.params import merge_config, parse_params

    return merge_config(parse_params(params), fetched_folders(fetch_dir))


def stage_key_fn(stage: str, inputs: tuple[str, ...], fused: bool = False):
    """A Prefect ``cache_key_fn`` for ``stage`` reading the artifact folders named in ``inputs``
    (task parameters ``<name>_dir``)."""
    from merging.stages import key_for, part_key

    def key(context, parameters) -> str:
        config = config_for(parameters["params"], parameters["fetch_dir"])
        value = key_for(stage, config, {n: parameters[f"{n}_dir"] for n in inputs}, fused=fused)
        if parameters.get("groups") is not None:
            value = part_key(value, parameters["groups"])
        return f"{stage}-{value}"

    return key


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, a plain logger otherwise (DVC stages)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mergeflow")


def log_artifact(stage: str, path: Path) -> str:
    run_logger().info("%s -> %s", stage, path)
    return str(path)
