"""The pipeline's collect_stats stage (``merging.pipeline.STAGES``): each input's statistics on
its own data for the data-aware methods, per model (``evaluation.stats``: RegMean's Grams,
Fisher) or, for RegMean++, of the whole recipe (``evaluation.regmean_plusplus``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from evaluation.regmean_plusplus import collect_plusplus_grams
from evaluation.stats import collect_stats
from merging.context import resolve_device
from merging.errors import MergeConfigError
from merging.fetch import fetched_folders
from merging.io.sources import is_adapter_folder
from merging.io.stats import STATS_FILE
from merging.pipeline_params import merge_config, named_stats
from merging.registry import get_method

__all__ = ["collect_pipeline_stats"]


def collect_pipeline_stats(params, inputs: dict[str, Path], folder: Path, store: Path, code: str = "") -> list[str]:
    """The collect_stats stage: each input's statistics on its own data (``models.inputs[].data``)
    when the method reads per-model statistics (RegMean's Grams, Fisher; RegMean++'s Grams of
    the whole recipe, ``_recipe_stats``) and the merge sections do not name its file already,
    written as ``<name>.safetensors`` with ``stats.json``; for any other method ``stats.json``
    alone, empty (its digest never changes, so the merge stages never rerun for it)."""
    need = get_method(params.merge.method).model_stats
    given = named_stats(params)
    written: dict[str, str] = {}
    if need is not None and any(ref.name not in given for ref in params.models.inputs):
        folders = fetched_folders(inputs["fetch"])
        device = str(resolve_device(params.pipeline.device))
        collect = _per_model_stats if need.per_model else _recipe_stats
        written = collect(params, folders, folder, given, device)
    (folder / STATS_FILE).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return [STATS_FILE, *(f"{name}.safetensors" for name in written)]


def _per_model_stats(params, folders: dict[str, str], folder: Path, given: dict[str, str], device: str) -> dict[str, str]:
    """Each input's statistics (RegMean's Grams, Fisher) on its own data, but for those the merge
    sections name a file for. {name: sha256 of its file}."""
    need = get_method(params.merge.method).model_stats
    base = folders[params.models.base.name]
    options = params.stats
    written = {}
    for ref in params.models.inputs:
        if ref.name in given:  # its statistics file is named in the merge sections
            continue
        if ref.data is None:
            raise MergeConfigError(
                f"models.inputs[{ref.name}].data: method {params.merge.method!r} reads each model's {need.kind} "
                "statistics on its own task data; give the model's training prompts (.txt or .jsonl), or its "
                f"statistics file as merge.*.stats: {{{ref.name}: FILE}}")
        model = folders[ref.name]
        if is_adapter_folder(Path(model)):  # an adapter runs on its base, folded in
            model = f"{base}+{model}"
        out = folder / f"{ref.name}.safetensors"
        collect_stats(model, ref.data, out, kind=need.kind, max_samples=options.max_samples,
                      max_length=options.max_length, batch_size=options.batch_size, device=device, seed=options.seed)
        written[ref.name] = hashlib.sha256(out.read_bytes()).hexdigest()
    return written


def _recipe_stats(params, folders: dict[str, str], folder: Path, given: dict[str, str], device: str) -> dict[str, str]:
    """RegMean++'s Grams of every input, collected through the partially merged model on each
    input's own data: a statistic of the whole recipe (the stage's key then holds the merge
    settings, ``merging.pipeline.RECIPE_STATS_PARAMS``). {name: sha256 of its file}."""
    if given:
        raise MergeConfigError(
            f"merge.method {params.merge.method!r}: its statistics come through the partially merged model, from every "
            f"model at once; name every model's statistics file in merge.*.stats or none (model {sorted(given)[0]!r} "
            "has one)")
    for ref in params.models.inputs:
        if ref.data is None:
            raise MergeConfigError(
                f"models.inputs[{ref.name}].data: method {params.merge.method!r} collects each model's Grams on its own "
                "task data through the partially merged model; give the model's training prompts (.txt or .jsonl)")
    if params.plan.slices is not None:
        raise MergeConfigError(f"merge.method {params.merge.method!r} merges whole models: plan.slices is not supported")
    options = params.stats
    names = [ref.name for ref in params.models.inputs]
    paths = collect_plusplus_grams(merge_config(params, folders), [ref.data for ref in params.models.inputs], folder,
                                   names, max_samples=options.max_samples, max_length=options.max_length,
                                   batch_size=options.batch_size, device=device)
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in zip(names, paths)}
