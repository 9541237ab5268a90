"""Streaming whole-checkpoint merge: ``merge_checkpoints``.

Order of work: resolve and open every model (checking names and shapes against the base),
validate the parameters of every tensor, run a whole-model first pass when the method
declares a global trim, then merge tensor by tensor in the base's file order and write
byte-bounded shards into a temporary folder that is renamed onto the target at the end.
Memory holds the base tensor, its T deltas and the method's temporaries for one tensor,
plus at most one pending output shard.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merging.api import check_model_count, run_stages
from merging.config import MergeConfig
from merging.errors import MergeConfigError, NonFiniteDeltaError
from merging.io.checkpoint import CheckpointReader
from merging.io.model_card import write_support_files
from merging.io.sources import ModelSource, open_source, resolve_folder
from merging.io.writer import ShardedWriter, atomic_output_dir, parse_size
from merging.plan import TensorEntry, build_plan
from merging.registry import get_method
from merging.resolve import build_params, split_global_parameters
from merging.spec import MethodSpec, TensorGroup
from merging.thresholds import global_thresholds

__all__ = ["merge_checkpoints", "MergeInputs", "open_inputs", "resolve_device"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeConfigError("device: cuda was asked for but no CUDA device is available; use cpu or auto")
    return torch.device(device)


class MergeInputs:
    """Everything opened and checked before any tensor is merged."""

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.spec: MethodSpec = get_method(config.merge_method)
        refs = [m.model for m in config.models]
        if self.spec.needs_base:
            if config.base_model is None:
                raise MergeConfigError(f"method {self.spec.name!r} needs base_model; add 'base_model: <path>'")
            base_ref = config.base_model
            entries = [m for m in config.models if m.model != base_ref]
        else:
            base_ref = config.base_model or refs[0]
            entries = list(config.models)
        check_model_count(self.spec, len(entries))
        self.has_base = config.base_model is not None
        self.base_ref = base_ref
        self.base_folder = resolve_folder(base_ref)
        self.base = CheckpointReader(self.base_folder, name=base_ref, allow_pickle=config.allow_pickle)
        base_shapes = self.base.shapes()
        self.entries = entries
        read_dtype = _DTYPES[config.dtype] if config.dtype else None
        self.sources: list[ModelSource] = [
            open_source(m.model, self.base_folder, base_shapes, config.allow_pickle, read_dtype) for m in entries
        ]
        self.model_names = [m.model for m in entries]
        self.shared, self.model_defaults = split_global_parameters(self.spec, config.parameters)
        num_layers = _num_layers(self.base_folder)
        self.plan: tuple[TensorEntry, ...] = build_plan(
            ((k, self.base.shape(k), self.base.dtype(k)) for k in self.base.keys()),
            config.include, config.exclude, config.ignore, num_layers,
        )
        self._param_cache: dict[Any, Any] = {}
        for entry in self.plan:  # validate every tensor's parameters before any work
            if entry.kind != "ignore":
                self.params_for(entry)
        self.stats = _load_stats(config.stats) if config.stats else None
        if self.spec.uses_stats and self.stats is None:
            log.warning("%s: no activation statistics given (create them with 'mergeflow collect-stats' and set "
                        "'stats: FILE'); running unscaled", self.spec.name)

    def params_for(self, entry: TensorEntry):
        """(method params, per-model params) for one tensor, cached by resolved values."""
        key = (entry.name, entry.layer_t)
        if key not in self._param_cache:
            self._param_cache[key] = build_params(
                self.spec, self.shared, self.model_defaults, [m.parameters for m in self.entries],
                self.model_names, entry.name, entry.layer_t,
            )
        return self._param_cache[key]


def _num_layers(folder: Path) -> int | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int):
            return data[key]
    return None


def _load_stats(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MergeConfigError(f"stats file {path} does not exist; create it with 'mergeflow collect-stats'")
    return load_file(path)


def open_inputs(config: MergeConfig) -> MergeInputs:
    return MergeInputs(config)


def _deltas(inputs: MergeInputs, entry: TensorEntry, base: torch.Tensor) -> torch.Tensor:
    deltas = torch.empty((len(inputs.sources), *base.shape), dtype=base.dtype, device=base.device)
    for t, source in enumerate(inputs.sources):
        d = source.delta(entry.name, base)
        if d is None:
            deltas[t].zero_()
            continue
        if not torch.isfinite(d).all():
            raise NonFiniteDeltaError(
                f"model {source.name!r}, tensor {entry.name!r}: the delta to the base holds NaN or Inf; "
                "the checkpoint is corrupt or was saved from a diverged run"
            )
        deltas[t] = d
    return deltas


def _global_thresholds(inputs: MergeInputs, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, frozenset]:
    """Per-model thresholds of a declared whole-model trim (streamed first pass)."""
    entries = [e for e in inputs.plan if e.kind != "ignore"]
    if not entries:
        return None, frozenset()
    params, model_params = inputs.params_for(entries[0])

    def deltas_of(entry) -> torch.Tensor:
        return _deltas(inputs, entry, inputs.base.get(entry.name).to(device=device, dtype=dtype))

    return global_thresholds(inputs.spec, params, model_params, entries, deltas_of, dtype, device)


def merge_checkpoints(
    config: MergeConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Merge the models of ``config`` into a Hugging Face folder at ``out``.

    Args:
        config: a validated merge config.
        out: target folder; written atomically (temporary folder beside it, then renamed).
        overwrite: replace an existing target.
        progress: called as ``progress(done, total, tensor_name)`` after each tensor.

    Returns:
        The output folder.
    """
    started = time.perf_counter()
    inputs = open_inputs(config)
    device = resolve_device(config.device)
    compute = _DTYPES[config.compute_dtype]
    read_dtype = _DTYPES[config.dtype] if config.dtype else None
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        thresholds, trim_kinds = _global_thresholds(inputs, device, compute)
        writer = ShardedWriter(tmp, parse_size(config.shard_size))
        out_dtype_name = config.out_dtype or config.dtype
        order = sorted(inputs.plan, key=lambda e: (inputs.base.file_of(e.name), 0))
        for done, entry in enumerate(order, start=1):
            raw = inputs.base.get(entry.name)
            out_dtype = _DTYPES[out_dtype_name] if out_dtype_name and raw.is_floating_point() else raw.dtype
            if entry.kind == "ignore":
                writer.add(entry.name, raw.to(out_dtype))
            else:
                if read_dtype is not None:
                    raw = raw.to(read_dtype)
                base = raw.to(device=device, dtype=compute)
                params, model_params = inputs.params_for(entry)
                group = TensorGroup(
                    name=entry.name, base=base, deltas=_deltas(inputs, entry, base), model_params=model_params,
                    kind=entry.kind, has_base=inputs.has_base,
                    trim_thresholds=thresholds if entry.kind in trim_kinds else None,
                    stats=_stats_for(inputs.stats, entry.name),
                )
                merged = base + run_stages(inputs.spec, group, params, config.seed)
                writer.add(entry.name, merged.to(out_dtype))
                del group, merged, base
            if progress is not None:
                progress(done, len(order), entry.name)
        files = writer.finalize()
        write_support_files(
            base_folder=inputs.base_folder,
            tokenizer_folder=_tokenizer_folder(config, inputs),
            out=tmp,
            config=config,
            out_dtype=out_dtype_name,
            spec=inputs.spec,
            model_names=inputs.model_names,
        )
    log.info("merged %d tensors with %s into %s (%d file(s), %.1f s)", len(order), inputs.spec.name, out,
             len(files), time.perf_counter() - started)
    return out


def _stats_for(stats: dict[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    if stats is None:
        return None
    return stats.get(name)


def _tokenizer_folder(config: MergeConfig, inputs: MergeInputs) -> Path | None:
    source = config.tokenizer_source
    if source is None or source == "base":
        return inputs.base_folder
    return resolve_folder(source)
