"""The evaluate stage: lm-eval-harness (Python API) on the merged model, the base and every
input. Each model's result is cached in ``<store>/eval-cache`` by its ``model_digest``, the
eval settings, the task files and the evaluation code, so the base and the inputs are
evaluated once however many merges and sweeps reuse them, a re-sharded model reuses its
scores and a model with another tokenizer does not. Runs sharing a store evaluate a model
one at a time (a lock beside its cache file): the second finds the first one's result."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from merging.digests import TOKENIZER_FILES, content_key, file_digest
from merging.errors import MergeConfigError
from merging.fetch import fetched_models
from merging.io.artifacts import artifact_digest, exclusive
from merging.io.writer import atomic_write_text
from merging.pipeline_params import PipelineParams, require_evaluation

__all__ = ["evaluate_models", "evaluate_folder", "result_path", "cache_file_name", "run_lm_eval", "primary_scores", "RESULTS_FILE"]

RESULTS_FILE = "results.json"
log = logging.getLogger(__name__)


def eval_targets(params: PipelineParams, fetch_dir: Path, model_dir: Path) -> dict[str, tuple[str, str]]:
    """name -> (folder, model digest) for the merged model, the base and (optionally) the inputs."""
    models = fetched_models(fetch_dir)
    base = params.models.base.name
    targets = {"merged": (str(model_dir), artifact_digest(model_dir)), "base": (models[base]["folder"], models[base]["digest"])}
    if params.eval.evaluate_inputs:
        for ref in params.models.inputs:
            targets[ref.name] = (models[ref.name]["folder"], models[ref.name]["digest"])
    return targets


def evaluate_models(params: PipelineParams, inputs: dict[str, Path], folder: Path, store: Path, code: str) -> list[str]:
    """Write ``results.json`` (name -> lm-eval result and primary scores) into ``folder``;
    ``code`` (the stage's code fingerprint) keys the per-model result cache."""
    require_evaluation(params, "evaluate")
    targets = eval_targets(params, inputs["fetch"], inputs["save"])
    base_folder = targets["base"][0]
    settings = {**params.eval.model_dump(mode="json"), "code": code}
    results = {}
    for name, (model_folder, digest) in targets.items():
        path = evaluate_folder(settings, model_folder, digest, store, base_folder)
        results[name] = json.loads(path.read_text())
    (folder / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return [RESULTS_FILE]


def _settings(eval_settings: dict[str, Any]) -> dict[str, Any]:
    settings = {k: eval_settings.get(k) for k in ("tasks", "include_path", "limit", "batch_size", "device", "code")}
    settings["include_digest"] = include_digest(settings["include_path"])
    return settings


def include_digest(include_path: str | None) -> str | None:
    """sha256 of every file under an lm-eval include folder (task YAMLs, data, loaders): a
    cached score stays valid only while the tasks it was computed on are byte-identical (a zoo
    of another seed keeps the task names but not the data)."""
    if not include_path or not Path(include_path).is_dir():
        return None
    root = Path(include_path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return content_key([[p.relative_to(root).as_posix(), file_digest(p)] for p in files])


def cache_file_name(digest: str, resolved_settings: dict[str, Any]) -> str:
    """The eval-cache file of a model digest under fully resolved settings (as results record them)."""
    return f"{content_key({'digest': digest, 'settings': resolved_settings})[:24]}.json"


def result_path(eval_settings: dict[str, Any], digest: str, store: str | Path) -> Path:
    """Where the cached result of evaluating a model of this digest with these settings lives."""
    return Path(store) / "eval-cache" / cache_file_name(digest, _settings(eval_settings))


def evaluate_folder(eval_settings: dict[str, Any], folder: str, digest: str, store: str | Path,
                    base_folder: str | None = None) -> Path:
    """Evaluate ``folder`` (or reuse the cached result for its digest); returns the result path."""
    path = result_path(eval_settings, digest, store)
    if path.is_file():
        return path
    with exclusive(path):
        if path.is_file():  # another run evaluated it while we waited
            return path
        settings = _settings(eval_settings)
        result = {"folder": folder, "digest": digest, "settings": settings, **run_lm_eval(folder, settings, base_folder)}
        result["scores"] = primary_scores(result)
        atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    log.info("evaluated %s -> %s", folder, path)
    return path


def _has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def run_lm_eval(folder: str, settings: dict[str, Any], base_folder: str | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on a local Hugging Face folder, or on a PEFT adapter folder
    (through peft, on ``base_folder``); a folder without tokenizer files borrows the base's.
    Returns lm-eval's results and sample counts."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = list(settings["tasks"])
    if (Path(folder) / "adapter_config.json").is_file():
        if base_folder is None:
            raise MergeConfigError(f"evaluating adapter {folder} needs its base model folder")
        model_args = f"pretrained={base_folder},peft={folder},dtype=float32"
    else:
        model_args = f"pretrained={folder},dtype=float32"
        if base_folder and not _has_tokenizer(folder):
            model_args += f",tokenizer={base_folder}"
    include = settings.get("include_path")
    include = str(Path(include).resolve()) if include else None
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include)  # registry names need the built-in index
    out = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, task_manager=manager,
        device=settings.get("device", "cpu"), batch_size=settings.get("batch_size", 8), limit=settings.get("limit"),
        log_samples=False,
    )
    return {"results": out["results"], "n_samples": out.get("n-samples", {})}


def primary_scores(results: dict[str, Any]) -> dict[str, float]:
    """task -> its main metric (acc, else acc_norm, else exact_match, else the first number)."""
    scores = {}
    for task_name, metrics in results["results"].items():
        for name in ("acc,none", "acc_norm,none", "exact_match,none"):
            if isinstance(metrics.get(name), (int, float)):
                scores[task_name] = float(metrics[name])
                break
        else:
            numeric = [v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k]
            if numeric:
                scores[task_name] = float(numeric[0])
    return scores
