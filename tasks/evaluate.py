"""evaluate: lm-eval-harness (Python API) on one model folder. Results are cached by the
model's weights digest and the eval settings, so the base and the input models are
evaluated once however many merges and sweeps reuse them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prefect import task

from merging.errors import MergeConfigError
from merging.io.artifacts import file_digest, read_manifest
from tasks.caching import run_logger
from tasks.fetch import fetched_models


def eval_key(settings: dict[str, Any], digest: str) -> str:
    payload = json.dumps({"digest": digest, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def eval_targets(params: dict, fetch_dir: str, model_dir: str) -> dict[str, tuple[str, str]]:
    """name -> (folder, weights digest) for the merged model, the base and (optionally) inputs."""
    models = fetched_models(fetch_dir)
    base_name = params["models"]["base"]["name"]
    targets = {"merged": (model_dir, read_manifest(model_dir)["output_digest"]),
               "base": (models[base_name]["folder"], models[base_name]["digest"])}
    if params["eval"].get("evaluate_inputs", True):
        for ref in params["models"]["inputs"]:
            entry = models[ref["name"]]
            targets[ref["name"]] = (entry["folder"], entry["digest"])
    return targets


def run_lm_eval(folder: str, settings: dict[str, Any], base_folder: str | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on a local Hugging Face folder, or on a PEFT adapter folder
    (through peft, on ``base_folder``); a folder without tokenizer files borrows the base's.
    Returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = list(settings["tasks"])
    if (Path(folder) / "adapter_config.json").is_file():
        if base_folder is None:
            raise MergeConfigError(f"evaluating adapter {folder} needs its base model folder")
        model_args = f"pretrained={base_folder},peft={folder},dtype=float32"
    else:
        model_args = f"pretrained={folder},dtype=float32"
        if base_folder and not has_tokenizer(folder):
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


def _settings(eval_settings: dict[str, Any]) -> dict[str, Any]:
    settings = {k: eval_settings.get(k) for k in ("tasks", "include_path", "limit", "batch_size", "device")}
    settings["include_digest"] = include_digest(settings["include_path"])
    return settings


def include_digest(include_path: str | None) -> str | None:
    """sha256 of every file under an lm-eval include folder (task YAMLs, data, loaders): a
    cached score stays valid only while the tasks it was computed on are byte-identical (a zoo
    of another seed keeps the task names but not the data)."""
    if not include_path or not Path(include_path).is_dir():
        return None
    root = Path(include_path)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(file_digest(path).encode())
    return h.hexdigest()


def result_path(eval_settings: dict[str, Any], digest: str, store: str) -> Path:
    """Where the cached result of evaluating weights ``digest`` with these settings lives."""
    return Path(store) / "eval-cache" / f"{eval_key(_settings(eval_settings), digest)[:24]}.json"


def evaluate_folder(eval_settings: dict[str, Any], folder: str, digest: str, store: str, base_folder: str | None = None) -> str:
    """Evaluate ``folder`` (or reuse the cached result for its digest); returns the result path."""
    settings = _settings(eval_settings)
    path = result_path(eval_settings, digest, store)
    if path.is_file():
        return str(path)
    result = {"folder": folder, "digest": digest, "settings": settings, **run_lm_eval(folder, settings, base_folder)}
    result["scores"] = primary_scores(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return str(path)


def _key(context, parameters) -> str:
    return "evaluate-" + eval_key(_settings(parameters["eval_settings"]), parameters["digest"])


@task(name="evaluate", cache_key_fn=_key, persist_result=True, result_serializer="json")
def evaluate(eval_settings: dict, folder: str, digest: str, store: str, base_folder: str | None = None) -> str:
    path = evaluate_folder(eval_settings, folder, digest, store, base_folder)
    run_logger().info("evaluated %s -> %s", folder, path)
    return path
