"""RegMean++ on Llama-style causal LMs (transformers): ``mergeflow regmean-plusplus CONFIG OUT``.

The recipe is a merge config with ``merge_method: regmean_plusplus`` whose models each name their
task data (``models[i].parameters.data``). The base M takes the merged embeddings first (the
method's rule for non-block tensors: mean, or base with ``embed_policy: base``); block 0's inputs
H_i^0 and the block kwargs (causal mask, rotary cos/sin) are captured from M on each model's data;
``merging.regmean_plusplus`` then merges block by block, collecting every candidate's Grams
through the partially merged M (``collect_plusplus_grams``; the pipeline's collect_stats stage
calls it too, keyed by the recipe). Here those Grams are written as each model's ``gram``
statistics in a temporary folder of this run (they depend on every model, dataset and setting), and
the ordinary merge (``merging.pipeline.merge_checkpoints``) writes the model with them, so the
output has every feature of ``mergeflow merge`` and is exactly RegMean with RegMean++'s Grams.
All models are held in memory at once (K + 1 models) with every calibration hidden state.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evaluation.stats import data_digest, load_causal_lm, read_texts
from merging.api import scaled_combine
from merging.config import MergeConfig
from merging.errors import MergeConfigError
from merging.io.sources import is_adapter_folder, resolve_folder
from merging.io.stats import write_stats
from merging.registry import get_method
from merging.regmean_plusplus import regmean_plusplus
from merging.resolve import build_params, split_global_parameters
from merging.spec import TensorGroup

__all__ = ["merge_regmean_plusplus", "collect_plusplus_grams"]

log = logging.getLogger(__name__)

METHOD = "regmean_plusplus"


class _Captured(Exception):
    """Stops M's forward once block 0's inputs are captured."""


def _block_inputs(lm, tokenizer, texts: list[str], batch_size: int, max_length: int, device: str):
    """Per batch: (hidden states entering block 0, block kwargs, token mask), from ``lm``."""
    layers = lm.get_decoder().layers
    found: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]] = []
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured["value"] = (hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                                  max_length=max_length)
                batch = {k: v.to(device) for k, v in batch.items()}
                try:
                    lm(**batch, use_cache=False)
                except _Captured:
                    pass
                hidden, kwargs = captured.pop("value")
                found.append((hidden, kwargs, batch["attention_mask"].bool()))
    finally:
        handle.remove()
    return found


def _layers_prefix(lm) -> str:
    layers = lm.get_decoder().layers
    return next(name for name, module in lm.named_modules() if module is layers) + "."


def merge_regmean_plusplus(config: MergeConfig, out: str | Path, *, max_samples: int = 256, max_length: int = 256,
                           batch_size: int = 8, device: str = "cpu", overwrite: bool = False,
                           progress: Callable[..., Any] | None = None) -> Path:
    """Merge ``config`` (``merge_method: regmean_plusplus``) into ``out``; see the module docstring.

    Raises:
        MergeConfigError: another method, no base, slices, or a model without ``data``.
    """
    from merging.pipeline import merge_checkpoints

    entries = _entries(config)
    shared, defaults = split_global_parameters(get_method(METHOD), config.parameters)
    resolved = build_params(get_method(METHOD), shared, defaults, [m.parameters for m in entries],
                            [m.model for m in entries], "", 0.0)
    data = [p.data for p in resolved[1]]
    for index, (entry, path) in enumerate(zip(entries, data)):
        if not path:
            raise MergeConfigError(f"{METHOD}: model {entry.model!r} (models[{index}]) has no 'data' parameter; set "
                                   f"models[{index}].parameters.data to its task data (.txt or .jsonl)")
    with tempfile.TemporaryDirectory(prefix="regmean-plusplus-") as folder:  # this run's Grams only
        paths = collect_plusplus_grams(config, data, Path(folder), [f"model{i}" for i in range(len(entries))],
                                       max_samples=max_samples, max_length=max_length, batch_size=batch_size,
                                       device=device)
        models = [entry.model_copy(update={"parameters": {**entry.parameters, "stats": str(path)}})
                  for entry, path in zip(entries, paths)]
        derived = config.model_copy(update={"models": tuple(models) + tuple(m for m in config.models if m not in entries)})
        return merge_checkpoints(derived, out, overwrite=overwrite, progress=progress)


def _entries(config: MergeConfig) -> list:
    """The merged models of a RegMean++ config (the base excluded), checked."""
    spec = get_method(config.merge_method)
    if spec.name != METHOD:
        raise MergeConfigError(f"RegMean++ statistics are collected for merge_method: {METHOD}, the config says "
                               f"{config.merge_method!r}; use 'mergeflow merge' for it")
    if config.base_model is None or config.slices is not None:
        raise MergeConfigError(f"{METHOD} needs base_model and whole models (models:, not slices:)")
    return [m for m in config.models if m.model != config.base_model]


def collect_plusplus_grams(config: MergeConfig, data: list[str | Path], folder: Path, names: list[str], *,
                           max_samples: int = 256, max_length: int = 256, batch_size: int = 8,
                           device: str = "cpu") -> list[Path]:
    """Each model's RegMean++ Grams for the recipe ``config`` (its merged models in order, the
    i-th on its task data ``data[i]``), written as ``gram`` statistics ``folder/<names[i]>.safetensors``:
    the embeddings merged first, then block by block, every candidate's Grams collected through
    the partially merged model (``merging.regmean_plusplus``). Returns the files, in order."""
    entries = _entries(config)
    spec = get_method(METHOD)
    names_in = [m.model for m in entries]
    refs = [f"{config.base_model}+{r}" if "+" not in r and is_adapter_folder(resolve_folder(r)) else r for r in names_in]
    shared, defaults = split_global_parameters(spec, config.parameters)

    def resolved(tensor: str, t: float = 0.0):
        return build_params(spec, shared, defaults, [m.parameters for m in entries], names_in, tensor, t)

    texts = [read_texts(Path(p), max_samples) for p in data]
    merged, tokenizer = load_causal_lm(config.base_model, device=device, allow_pickle=config.allow_pickle)
    candidates = [load_causal_lm(ref, device=device, allow_pickle=config.allow_pickle)[0] for ref in refs]
    prefix = _layers_prefix(merged)
    num_layers = len(merged.get_decoder().layers)

    with torch.no_grad():  # M's embeddings: the method's rule for them, as the final merge applies it
        embed = merged.get_input_embeddings().weight
        key = next(n for n, p in merged.named_parameters() if p is embed)
        params, model_params = resolved(key)
        deltas = torch.stack([c.get_input_embeddings().weight.float() - embed.float() for c in candidates])
        group = TensorGroup(name=key, base=embed.float(), deltas=deltas, model_params=model_params, kind="other")
        embed.copy_((embed.float() + scaled_combine(spec, group, {"deltas": deltas}, params)).to(embed.dtype))

    inputs = [_block_inputs(merged, tokenizer, t, batch_size, max_length, device) for t in texts]

    def run_block(block, hidden, task, batch):
        out = block(hidden, **inputs[task][batch][1])
        return out[0] if isinstance(out, tuple) else out

    def params_for(layer: int, name: str):
        params, model_params = resolved(f"{prefix}{layer}.{name}", layer / (num_layers - 1) if num_layers > 1 else 0.0)
        return params, [p.weight for p in model_params]

    log.info("%s: merging %d blocks of %d models block by block", METHOD, num_layers, len(candidates))
    grams = regmean_plusplus(merged.get_decoder().layers, [c.get_decoder().layers for c in candidates],
                             [[h for h, _, _ in batches] for batches in inputs],
                             [[m for _, _, m in batches] for batches in inputs], params_for, run_block)
    candidates.clear()
    inputs.clear()
    paths = []
    for i, name in enumerate(names):
        tensors, tokens, aliases = {}, {}, {}
        for layer, per_model in enumerate(grams):
            block = per_model[i]
            tensors |= {f"{prefix}{layer}.{k}": v for k, v in block.grams.items()}
            tokens |= {f"{prefix}{layer}.{k}": n for k, n in block.tokens.items()}
            aliases |= {f"{prefix}{layer}.{k}": f"{prefix}{layer}.{v}" for k, v in block.aliases.items()}
        paths.append(write_stats(folder / f"{name}.safetensors", tensors, "gram", tokens=tokens, aliases=aliases,
                                 info={"model": refs[i], "data": str(data[i]), "data_sha256": data_digest(Path(data[i])),
                                       "producer": METHOD}))
    return paths
