"""The evaluate stage: lm-eval-harness (Python API) on the merged model, the base and every
input. Each model's result is cached in ``<store>/eval-cache`` by its ``model_digest``, the
eval settings (tasks, limit, batch size, device, dtype, few-shot, chat template, model
arguments), the task files and the evaluation code, so the base and the inputs are evaluated
once however many merges and sweeps reuse them, a re-sharded model reuses its scores and a
model with another tokenizer does not. Runs sharing a store evaluate a model one at a time (a
lock beside its cache file): the second finds the first one's result.

Decoder-only models run on lm-eval's causal backend, encoder-decoder models (T5, BART, ...) on
its seq2seq backend; encoder-only models (BERT, RoBERTa, ...) are refused: lm-eval's language
model tasks need a model that scores or generates continuations (``lm_backend``).

Tasks are lm-eval task names: those of ``eval.include_path`` (local YAMLs) or lm-eval's own
(``arc_easy``, ``mmlu``, ...). Every task is built before the model is loaded, so a dataset that
cannot be loaded (offline, not in the local datasets cache) is a one-line error naming the task
and the dataset. Gated models and datasets read ``HF_TOKEN`` from the environment (huggingface_hub
does); a token is never a params key.

A result also holds, per task, each item's value of the task's main metric in lm-eval's item
order (``items``: acc as a string of 0/1 digits, ``merging.bootstrap.encode_values``), where the
mean of those values is the task's score: what the report's bootstrap intervals resample."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from merging.bootstrap import encode_values
from merging.digests import TOKENIZER_FILES, content_key, file_digest
from merging.errors import MergeConfigError, MergeflowError
from merging.fetch import fetched_models
from merging.io.artifacts import artifact_digest, exclusive
from merging.io.files import model_file, read_json_object
from merging.io.writer import atomic_write_text
from merging.pipeline_params import PipelineParams, require_evaluation

__all__ = ["evaluate_models", "evaluate_folder", "eval_settings", "result_path", "cache_file_name", "run_lm_eval",
           "primary_scores", "item_scores", "lower_is_better", "lm_backend", "RESULTS_FILE"]

_ENCODER_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                  "ForMultipleChoice", "ForPreTraining", "ForNextSentencePrediction")

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
    settings = eval_settings(params, code)
    results = {}
    for name, (model_folder, digest) in targets.items():
        path = evaluate_folder(settings, model_folder, digest, store, base_folder)
        results[name] = json.loads(path.read_text())
    (folder / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return [RESULTS_FILE]


_KEYED = ("tasks", "include_path", "limit", "batch_size", "device", "dtype", "num_fewshot", "apply_chat_template",
          "model_args", "code")


def eval_settings(params: PipelineParams, code: str = "") -> dict[str, Any]:
    """The evaluation settings of ``params``, resolved: the device defaults to the pipeline's
    (``auto``: cuda when available); ``code`` is the evaluate stage's code fingerprint."""
    settings = params.eval.model_dump(mode="json")
    device = settings["device"] or params.pipeline.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {**settings, "device": device, "code": code}


def _settings(eval_settings: dict[str, Any]) -> dict[str, Any]:
    """What a cached result is keyed on (and records): every setting that can change a score."""
    settings = {k: eval_settings.get(k) for k in _KEYED}
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


def lm_backend(folder: str | Path) -> str:
    """lm-eval's hf backend for a model folder: ``seq2seq`` for an encoder-decoder model,
    ``causal`` otherwise; an encoder-only model (its config names a masked-LM or classification
    head) is a ``MergeConfigError``: lm-eval cannot score it."""
    owner = f"model {str(folder)!r}"
    path = model_file(Path(folder), "config.json", owner, required=False)
    config = read_json_object(path, owner) if path is not None else {}
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    if config.get("is_encoder_decoder") or config.get("model_type") in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq"
    heads = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if heads and all(a.endswith(_ENCODER_HEADS) for a in heads):
        raise MergeConfigError(
            f"{owner} is an encoder-only model ({', '.join(heads)}): lm-eval's tasks score or generate text with a "
            "causal or encoder-decoder language model and cannot evaluate it. Merge it without evaluating ('mergeflow "
            "merge', or 'dvc repro save' in the pipeline) and evaluate it with your own task code")
    return "causal"


def _model_args(folder: str, settings: dict[str, Any], base_folder: str | None) -> dict[str, Any]:
    """lm-eval's hf model arguments: the model (an adapter through peft on its base; a folder
    without tokenizer files borrows the base's), its backend (``lm_backend``), the dtype and
    ``eval.model_args``."""
    if (Path(folder) / "adapter_config.json").is_file():
        if base_folder is None:
            raise MergeConfigError(f"evaluating adapter {folder} needs its base model folder")
        model = {"pretrained": base_folder, "peft": folder}
    else:
        model = {"pretrained": folder}
        if base_folder and not _has_tokenizer(folder):
            model["tokenizer"] = base_folder
    return {**model, "backend": lm_backend(model["pretrained"]), "dtype": settings.get("dtype") or "auto",
            **(settings.get("model_args") or {})}


def _task_manager(tasks: list[str], include: str | None):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include)  # lm-eval's own task names need its built-in index
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MergeConfigError(f"eval.tasks: unknown lm-eval task(s) {unknown}: not in eval.include_path "
                               f"({include or 'not set'}) nor lm-eval's own tasks (lm-eval ls tasks lists them)")
    return manager


def _check_datasets(tasks: list[str], manager) -> None:
    """Build every task (which loads its dataset) before any model is loaded; a task whose
    dataset cannot be loaded is named with the dataset."""
    for name in tasks:
        try:
            manager.load([name])
        except Exception as err:  # datasets raises many types (offline, missing, gated): all mean "cannot load"
            entry = manager.task_index.get(name)
            config = (entry.cfg if entry is not None else None) or {}
            dataset = str(config.get("dataset_path") or "of one of its subtasks")
            if config.get("dataset_name"):
                dataset += f" (config {config['dataset_name']})"
            offline = any(os.environ.get(v) in ("1", "true", "True") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            message = f"eval task {name!r}: dataset {dataset} could not be loaded ({type(err).__name__}{': ' + reason if reason else ''}); "
            if offline:  # the same every time: not retried
                raise MergeConfigError(message + "offline: put it in the local datasets cache first (run once with "
                                                 "network, or copy HF_HOME)") from None
            raise MergeflowError(message + "check the network, the dataset name, and HF_TOKEN for a gated dataset") from None


def run_lm_eval(folder: str, settings: dict[str, Any], base_folder: str | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on a local Hugging Face folder, or on a PEFT adapter folder
    (through peft, on ``base_folder``), with the settings of ``eval`` (``eval_settings``).
    Returns lm-eval's results, sample counts, few-shot counts, metric directions, config and
    per-item scores (``item_scores``)."""
    import lm_eval

    tasks = list(settings["tasks"])
    include = settings.get("include_path")
    manager = _task_manager(tasks, str(Path(include).resolve()) if include else None)
    _check_datasets(tasks, manager)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=_model_args(folder, settings, base_folder), tasks=tasks, task_manager=manager,
        device=settings.get("device") or "cpu", batch_size=settings.get("batch_size", 8), limit=settings.get("limit"),
        num_fewshot=settings.get("num_fewshot"), apply_chat_template=settings.get("apply_chat_template") or False,
        log_samples=True,  # for the per-item scores; nothing is written to disk
    )
    return {"results": out["results"], "n_samples": out.get("n-samples", {}), "n_shot": out.get("n-shot", {}),
            "higher_is_better": out.get("higher_is_better", {}),
            "config": {k: out.get("config", {}).get(k) for k in ("model_args", "batch_size", "batch_sizes", "device")},
            "items": item_scores(out["results"], out.get("samples") or {})}


_PRIMARY = ("acc,none", "acc_norm,none", "exact_match,none")


def _primary(metrics: dict[str, Any]) -> str | None:
    """A task's main metric: acc, else acc_norm, else exact_match, else the first number."""
    for name in _PRIMARY:
        if isinstance(metrics.get(name), (int, float)):
            return name
    return next((k for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k), None)


def item_scores(results: dict[str, Any], samples: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """task -> ``{"metric", "values"}``: each item's value of the task's main metric (``_primary``)
    in doc order, from lm-eval's logged samples. Kept only where every item has a number and
    their mean is the task's score (a mean-aggregated metric such as acc; not a corpus-level
    one such as BLEU or perplexity, nor a group, which logs no samples of its own)."""
    items = {}
    for task_name, logged in samples.items():
        name = _primary(results.get(task_name, {}))
        if name is None:
            continue
        metric, _, filter_key = name.partition(",")
        rows = sorted((s["doc_id"], s.get(metric)) for s in logged if s.get("filter") == filter_key)
        values = [v for _, v in rows]
        if not values or not all(isinstance(v, (int, float)) for v in values):
            continue
        if abs(sum(values) / len(values) - float(results[task_name][name])) > 1e-6:
            continue
        items[task_name] = {"metric": name, "values": encode_values([float(v) for v in values])}
    return items


def primary_scores(results: dict[str, Any]) -> dict[str, float]:
    """task -> its main metric (acc, else acc_norm, else exact_match, else the first number)."""
    scores = {}
    for task_name, metrics in results["results"].items():
        name = _primary(metrics)
        if name is not None:
            scores[task_name] = float(metrics[name])
    return scores


def lower_is_better(result: dict[str, Any]) -> set[str]:
    """The tasks whose main metric lm-eval marks lower-is-better (perplexities): a rise there is
    what a drop of accuracy is elsewhere."""
    directions = result.get("higher_is_better") or {}
    lower = set()
    for task_name, metrics in result["results"].items():
        name = _primary(metrics)
        if name is not None and directions.get(task_name, {}).get(name.split(",")[0]) is False:
            lower.add(task_name)
    return lower
