"""``mergeflow multi``: a mergekit-multi file as one Prefect flow, one cached task per step.

A step's cache key is ``merging.multi.step_key``: its config, its dependencies' keys, its other
models' files and the merge code. Editing a step changes its key and so the keys of every step
that reads it, transitively; the others stay Cached. A cache hit is trusted only when the
output folder still holds that key's result (``is_step_output``), else the step reruns. The
cache records live in ``<intermediate_dir>/.mergeflow-multi`` beside the outputs.
``lazy`` (mergekit's ``--lazy``) keeps any complete existing output of a step, edited or not.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from merging import fingerprint
from merging.config import parse_merge_config
from merging.errors import OutputExistsError
from merging.multi import MARKER, Step, is_step_output, mark_step_output, parse_multi, step_key

__all__ = ["multi_merge", "merge_step"]

RECORDS = ".mergeflow-multi"


def _has_model(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


@task(name="merge-step", persist_result=True, result_serializer="json", cache_key_fn=lambda ctx, p: p["key"])
def merge_step(name: str, config: dict, out: str, key: str, lazy: bool = False) -> str:
    """Merge one step into ``out`` (replacing an earlier output of a step, never another folder)."""
    from merging.pipeline import merge_checkpoints

    target = Path(out)
    log = get_run_logger()
    if lazy and _has_model(target):
        log.info("%s: %s already holds a model; kept (--lazy)", name, target)
        return str(target)
    if target.exists() and not (target / MARKER).is_file():
        raise OutputExistsError(f"step {name!r}: {target} exists and is not the output of a step; move it or "
                                "choose another --intermediate-dir / --out-path")
    merge_checkpoints(parse_merge_config(config, f"step {name!r}"), target, overwrite=True)
    mark_step_output(target, key)
    log.info("%s -> %s", name, target)
    return str(target)


def _run(step: Step, key: str, records: Path, lazy: bool) -> str:
    fresh = is_step_output(step.out, key) or (lazy and _has_model(step.out))
    task_ = merge_step.with_options(task_run_name=f"step:{step.label}", result_storage=records,
                                    refresh_cache=not fresh or None)
    return task_(step.label, step.config, str(step.out), key, lazy)


@flow(name="mergeflow-multi")
def multi_merge(file: str, intermediate_dir: str, out_path: str | None = None, lazy: bool = False) -> dict[str, str]:
    """Run every step of a multi-step merge file in dependency order; returns step -> output folder."""
    text = Path(file).read_text()
    steps = parse_multi(text, intermediate_dir, out_path, source=str(file))
    records = Path(intermediate_dir).absolute() / RECORDS
    records.mkdir(parents=True, exist_ok=True)
    code = fingerprint.fingerprint(["merging.pipeline"])
    keys: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for step in steps:
        key = step_key(step, keys, code)
        keys[step.label] = key
        outputs[step.label] = _run(step, key, records, lazy)
    return outputs
