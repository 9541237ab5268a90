"""The merge stages as functions over one tensor group, and the context they share.

``deltas`` (theta_t - theta_0) -> ``decompose`` -> ``sparsify`` -> ``combine`` (merged delta,
times lambda) -> ``save`` (base + merged delta, cast once to the output dtype). Each function
takes the context, the plan entry and the tensors its input stages produced for that group,
and returns what its stage stores; none of them knows whether its inputs came from artifacts
on disk or straight from the previous function in memory (``merging.pipeline`` decides).
The whole-model trim thresholds (TIES, DRM) are sparsify's first pass over all groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from merging.api import scaled_combine
from merging.config import MergeConfig
from merging.inputs import DTYPES, MergeInputs, resolve_device, task_deltas, tokenizer_folder
from merging.io.model_card import model_card, write_support_files
from merging.plan import TensorEntry
from merging.rng import generator_for
from merging.spec import TensorGroup
from merging.thresholds import global_thresholds

__all__ = ["StageContext", "Tensors", "compute_deltas", "decompose", "sparsify", "combine", "save",
           "trim_thresholds", "write_model_files"]

Tensors = dict[str, torch.Tensor]
Inputs = Mapping[str, Tensors]


class StageContext:
    """The opened inputs of a merge, the device and dtypes, and the first-pass results."""

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.inputs = MergeInputs(config)
        self.spec = self.inputs.spec
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.compute_dtype]
        self.out_dtype_name = config.out_dtype or config.dtype
        self.thresholds: tuple[torch.Tensor | None, frozenset] = (None, frozenset())

    def merged_entries(self) -> list[TensorEntry]:
        """Plan entries the method merges, in plan order."""
        return [e for e in self.inputs.plan if e.kind != "ignore"]

    def all_entries(self) -> list[TensorEntry]:
        """Every tensor of the output, in the base's file order."""
        return sorted(self.inputs.plan, key=lambda e: self.inputs.base.file_of(e.name))

    def base(self, name: str) -> torch.Tensor:
        raw = self.inputs.base.get(name)
        if self.config.dtype:
            raw = raw.to(DTYPES[self.config.dtype])
        return raw.to(device=self.device, dtype=self.dtype)

    def group(self, entry: TensorEntry, deltas: torch.Tensor, with_thresholds: bool = False) -> TensorGroup:
        _, model_params = self.inputs.params_for(entry)
        values, kinds = self.thresholds
        stats = self.inputs.stats.get(entry.name) if self.inputs.stats is not None else None
        return TensorGroup(
            name=entry.name, base=self.base(entry.name), deltas=deltas.to(self.device), model_params=model_params,
            kind=entry.kind, has_base=self.inputs.has_base,
            trim_thresholds=values if with_thresholds and entry.kind in kinds else None, stats=stats,
        )

    def params(self, entry: TensorEntry):
        return self.inputs.params_for(entry)[0]


def _on_device(ctx: StageContext, tensors: Tensors) -> Tensors:
    return {k: v.to(ctx.device) for k, v in tensors.items()}


def compute_deltas(ctx: StageContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """theta_t - theta_0 of every input, stacked: ``{"deltas": (T, *shape)}``."""
    return {"deltas": task_deltas(ctx.inputs, entry, ctx.base(entry.name))}


def decompose(ctx: StageContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """The method's decomposition (identity for element-wise methods)."""
    return ctx.spec.decompose(ctx.group(entry, inputs["deltas"]["deltas"]), ctx.params(entry))


def sparsify(ctx: StageContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """Trim / drop / prune and sign election, with the per-tensor generator."""
    group = ctx.group(entry, inputs["deltas"]["deltas"], with_thresholds=True)
    factors = _on_device(ctx, inputs["decompose"])
    return ctx.spec.sparsify(group, factors, ctx.params(entry), generator_for(ctx.config.seed, entry.name))


def combine(ctx: StageContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """The merged delta of the group, scaled by lambda."""
    group = ctx.group(entry, inputs["deltas"]["deltas"])
    return {"merged_delta": scaled_combine(ctx.spec, group, _on_device(ctx, inputs["sparsify"]), ctx.params(entry))}


def save(ctx: StageContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """base + merged delta in the output dtype; ignored tensors keep the base value."""
    raw = ctx.inputs.base.get(entry.name)
    out_dtype = DTYPES[ctx.out_dtype_name] if ctx.out_dtype_name and raw.is_floating_point() else raw.dtype
    if entry.kind == "ignore":
        return {entry.name: raw.to(out_dtype)}
    merged = ctx.base(entry.name) + inputs["combine"]["merged_delta"].to(ctx.device)
    return {entry.name: merged.to(out_dtype)}


def trim_thresholds(ctx: StageContext, deltas_of: Callable[[TensorEntry], torch.Tensor]) -> None:
    """Sparsify's first pass: the whole-model per-model thresholds of a declared global trim."""
    entries = ctx.merged_entries()
    if entries:
        params, model_params = ctx.inputs.params_for(entries[0])
        ctx.thresholds = global_thresholds(ctx.spec, params, model_params, entries, deltas_of, ctx.dtype, ctx.device)


def write_model_files(ctx: StageContext, out: Path) -> None:
    """config, generation config, tokenizer, model card and recipe beside the weights."""
    config = ctx.config
    recipe = config.to_yaml()
    card = model_card(ctx.spec.name, ctx.spec.paper, config.base_model, ctx.inputs.model_names, recipe)
    write_support_files(base_folder=ctx.inputs.base_folder, tokenizer_folder=tokenizer_folder(config, ctx.inputs),
                        out=out, out_dtype=ctx.out_dtype_name, card=card, recipe_yaml=recipe)
