"""The merge stages as functions over one tensor group.

``deltas`` (theta_t - theta_0) -> ``decompose`` -> ``sparsify`` -> ``combine`` (merged delta,
times lambda) -> ``save`` (base + merged delta, cast once to the output dtype). Each function
takes the context (``merging.context.MergeContext``), the plan entry and the tensors its input
stages produced for that group, and returns what its stage stores; none of them knows whether
its inputs came from artifacts on disk or straight from the previous function in memory
(``merging.pipeline`` decides). The whole-model trim thresholds (TIES, DRM) are sparsify's
first pass over all groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from merging.api import scaled_combine, scaled_combine_factors
from merging.context import DTYPES, MergeContext, all_finite
from merging.errors import NonFiniteOutputError
from merging.io.model_card import model_card, write_support_files
from merging.io.shard_layout import PlannedTensor
from merging.plan import TensorEntry
from merging.rng import generator_for
from merging.spec import LoraFactors
from merging.thresholds import global_thresholds
from merging.tokenizer_merge import chat_template_text, write_tokenizer

__all__ = ["Tensors", "compute_deltas", "decompose", "sparsify", "combine", "save", "saved_dtype", "saved_tensors",
           "deltas_bytes", "merged_delta_bytes", "trim_thresholds", "write_model_files"]

Tensors = dict[str, torch.Tensor]
Inputs = Mapping[str, Tensors]


def compute_deltas(ctx: MergeContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """theta_t - theta_0 of every input, stacked: ``{"deltas": (T, *shape)}``; when every input
    is a LoRA adapter of the matrix, its factors too (``LoraFactors.to_tensors``), and only them
    on the factor route end to end (``MergeContext.factored``)."""
    lora = ctx.lora_factors(entry)
    if lora is not None and ctx.factored(entry):  # the factor route end to end: no (T, n, m) stack at all
        return lora.to_tensors()
    return {"deltas": ctx.deltas(entry), **(lora.to_tensors() if lora is not None else {})}


def decompose(ctx: MergeContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """The method's decomposition (identity for element-wise methods)."""
    return ctx.spec.decompose(ctx.group(entry, inputs["deltas"]), ctx.params_for(entry)[0])


def sparsify(ctx: MergeContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """Trim / drop / prune and sign election, with the per-tensor generator."""
    group = ctx.group(entry, inputs["deltas"], with_thresholds=True)
    if ctx.spec.has_decompose:
        factors = {k: v.to(ctx.device) for k, v in inputs["decompose"].items()}
    else:  # identity: the group's deltas, in the space the method runs in (full, or core)
        factors = {"deltas": group.deltas}
    return ctx.spec.sparsify(group, factors, ctx.params_for(entry)[0], generator_for(ctx.config.seed, ctx.rng_name(entry.name)))


def combine(ctx: MergeContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """The merged delta of the group, scaled by lambda (mapped back from Core Space when the
    method ran there); on the factor route end to end, as factors ``merged_b @ merged_a``."""
    group = ctx.group(entry, inputs["deltas"])
    if ctx.spec.has_sparsify or ctx.spec.has_decompose:
        factors = {k: v.to(ctx.device) for k, v in inputs["sparsify"].items()}
    else:  # identity stages: the group's deltas, in the space the method runs in
        factors = {"deltas": group.deltas}
    params = ctx.params_for(entry)[0]
    if group.deltas.is_meta:  # the factor route end to end: the merged delta as factors, delta = b @ a
        b, a = scaled_combine_factors(ctx.spec, group, factors, params)
        return {"merged_b": b, "merged_a": a}
    merged = scaled_combine(ctx.spec, group, factors, params)
    space = ctx.core_space(entry)
    if space is not None:
        merged = (space.u_ref.to(merged.dtype) @ merged @ space.v_ref.T.to(merged.dtype))
    knots = ctx.knots_space(entry, LoraFactors.from_tensors(inputs["deltas"]), inputs["deltas"].get("deltas"))
    if knots is not None:
        merged = knots.basis.to(merged.dtype) @ merged
    return {"merged_delta": merged}


def saved_dtype(ctx: MergeContext, entry: TensorEntry) -> torch.dtype:
    """The dtype ``save`` writes a tensor in: ``out_dtype`` for floating-point tensors, else as stored."""
    return DTYPES[ctx.out_dtype_name] if ctx.out_dtype_name and entry.dtype.is_floating_point else entry.dtype


def saved_tensors(ctx: MergeContext) -> list[PlannedTensor]:
    """Every tensor ``save`` will write, in output order, with its shape and dtype: what the
    saved model's shard layout is computed from before any tensor is merged."""
    return [PlannedTensor(e.name, tuple(e.shape), saved_dtype(ctx, e)) for e in ctx.all_entries()]


def save(ctx: MergeContext, entry: TensorEntry, inputs: Inputs) -> Tensors:
    """base + merged delta in the output dtype; ignored tensors keep the base value."""
    out_dtype = saved_dtype(ctx, entry)
    if entry.kind == "ignore":
        return {entry.name: ctx.raw_base(entry.name).to(out_dtype)}
    merged = ctx.base_tensor(entry.name) + inputs["combine"]["merged_delta"].to(ctx.device)
    out = merged.to(out_dtype)
    if not ctx.config.allow_nonfinite and not all_finite(out):
        raise NonFiniteOutputError(_nonfinite_message(ctx, entry, merged, out_dtype))
    return {entry.name: out}


def _nonfinite_message(ctx: MergeContext, entry: TensorEntry, merged: torch.Tensor, out_dtype: torch.dtype) -> str:
    """Why a merged tensor is not finite: the output dtype's range, or the parameters."""
    where = f"merged tensor {entry.name!r} holds NaN or Inf"
    fix = "; set allow_nonfinite: true to write it anyway"
    if torch.isfinite(merged).all():
        largest = merged.abs().max().item()
        return (f"{where}: values up to {largest:.3g} overflow out_dtype {str(out_dtype).removeprefix('torch.')} "
                f"(max {torch.finfo(out_dtype).max:.3g}); lower lambda or the weights, or choose a wider out_dtype{fix}")
    params, model_params = ctx.params_for(entry)
    settings = [f"{k}={v}" for k, v in params.model_dump(by_alias=True).items()]
    settings += [f"{name}: {k}={v}" for name, mp in zip(ctx.model_names, model_params) for k, v in mp.model_dump().items()]
    return f"{where} (method {ctx.spec.name}; {', '.join(settings)}): a parameter is too large for the compute dtype{fix}"


def deltas_bytes(ctx: MergeContext, entries: list[TensorEntry]) -> int:
    """About the bytes the deltas of ``entries`` take stored: one (T, *shape) stack per group in
    the compute dtype (LoRA factors, when stored beside, are small). Decompositions and
    selections are estimated at the same size."""
    def inputs(entry: TensorEntry) -> int:
        return len(ctx.mapped[entry.name].inputs) if ctx.mapped is not None else len(ctx.sources)

    return sum(inputs(e) * math.prod(e.shape) * ctx.dtype.itemsize for e in entries)


def merged_delta_bytes(ctx: MergeContext, entries: list[TensorEntry]) -> int:
    """The bytes combine stores for ``entries``: one merged delta per group, compute dtype."""
    return sum(math.prod(e.shape) * ctx.dtype.itemsize for e in entries)


def trim_thresholds(ctx: MergeContext, read: Callable[[str, TensorEntry], Tensors]) -> None:
    """Sparsify's first pass: the whole-model per-model thresholds of a declared global trim,
    over every group's deltas."""
    entries = ctx.merged_entries()
    if entries:
        params, model_params = ctx.params_for(entries[0])
        # in the space the method runs in: Core Space cores, KnOTS representations or the deltas
        ctx.thresholds = global_thresholds(ctx.spec, params, model_params, entries, lambda e: ctx.in_space(e, read("deltas", e))[0],
                                           ctx.dtype, ctx.device)


def write_model_files(ctx: MergeContext, out: Path) -> None:
    """config, generation config, tokenizer, model card and recipe beside the weights."""
    recipe = ctx.config.to_yaml()
    card = None
    if ctx.config.write_model_card:
        card = model_card(ctx.spec.name, ctx.spec.paper, ctx.config.base_model, ctx.model_names, recipe)
    tokenizer = ctx.tokenizer_folder()
    template = chat_template_text(ctx.config.chat_template, [ctx.base_folder, *ctx.input_folders().values()])
    rebuilt = ctx.vocabulary is not None or (template is not None and tokenizer is not None)
    write_support_files(base_folder=ctx.base_folder, tokenizer_folder=None if rebuilt else tokenizer, out=out,
                        out_dtype=ctx.out_dtype_name, card=card, recipe_yaml=recipe, num_layers=ctx.out_layers,
                        vocab_size=ctx.vocabulary.rows if ctx.vocabulary is not None else None)
    if rebuilt:  # a merged vocabulary and/or a chat template of its own
        write_tokenizer(out, tokenizer, ctx.vocabulary.tokenizer_json if ctx.vocabulary is not None else None, template)
