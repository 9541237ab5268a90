"""The public door for one tensor group: ``merge_tensors``.

It runs a method's stages on plain tensors, with parameters given as plain dicts, exactly
as ``merge_checkpoints`` does per tensor. Spec worked examples and method tests call it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from merging.errors import MergeConfigError
from merging.registry import get_method
from merging.resolve import build_params, split_global_parameters
from merging.rng import generator_for
from merging.spec import MethodSpec, ModelStatistic, TensorGroup, TensorKind
from merging.thresholds import global_thresholds

__all__ = ["merge_tensors", "run_stages", "scaled_combine", "scaled_combine_factors", "check_model_count"]


def check_model_count(spec: MethodSpec, count: int) -> None:
    """Raise if ``count`` task models do not fit the method's contract."""
    if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
        bound = (f"exactly {spec.min_models}" if spec.max_models == spec.min_models
                 else f"at least {spec.min_models}" + (f" and at most {spec.max_models}" if spec.max_models else ""))
        base_note = " besides the base model" if spec.needs_base else ""
        raise MergeConfigError(f"method {spec.name!r} needs {bound} model(s){base_note}; got {count}")


def scaled_combine(spec: MethodSpec, group: TensorGroup, factors: dict[str, torch.Tensor], params: Any) -> torch.Tensor:
    """The method's combine, scaled by ``lambda`` (with ``scaled_combine_factors``, the one place
    lambda is applied)."""
    return _scaled(spec.combine(group, factors, params), params)


def scaled_combine_factors(spec: MethodSpec, group: TensorGroup, factors: dict[str, torch.Tensor],
                           params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's ``combine_factors``, (b, a) with the merged delta b @ a scaled by ``lambda``."""
    b, a = spec.combine_factors(group, factors, params)
    return _scaled(b, params), a


def _scaled(tensor: torch.Tensor, params: Any) -> torch.Tensor:
    return tensor * params.lambda_ if params.lambda_ != 1 else tensor


def run_stages(spec: MethodSpec, group: TensorGroup, params: Any, seed: int) -> torch.Tensor:
    """decompose -> sparsify -> combine; returns the merged delta scaled by ``lambda``."""
    factors = spec.decompose(group, params)
    factors = spec.sparsify(group, factors, params, generator_for(seed, group.name))
    return scaled_combine(spec, group, factors, params)


def merge_tensors(
    method: str,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    *,
    seed: int = 0,
    name: str = "tensor",
    kind: TensorKind | None = None,
    compute_dtype: torch.dtype = torch.float32,
    has_base: bool = True,
    stats: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge one tensor: ``base`` and the fine-tuned ``models`` (full weights, same shape).

    Args:
        method: registry name.
        base: the base tensor theta_0.
        models: fine-tuned tensors theta_t.
        params: shared params (mergekit's global ``parameters``).
        model_params: per-model params, one mapping per model.
        seed: seed of the per-tensor generator (random methods).
        name: tensor name (seeds the generator; filters match on it).
        kind: ``"matrix"`` or ``"other"``; default: matrix for 2-D tensors.
        compute_dtype: float32 (default) or float64.
        has_base: False if ``base`` is only a reference (see ``TensorGroup.has_base``).
        stats: per-model statistics of this tensor, one per model (RegMean: the input Gram
            (in, in); Fisher: the diagonal Fisher); Fisher's norms are this tensor's alone.

    Returns:
        The merged tensor in ``compute_dtype``.
    """
    spec = get_method(method)
    check_model_count(spec, len(models))
    shared, defaults = split_global_parameters(spec, params or {})
    per_model = model_params or [{} for _ in models]
    if len(per_model) != len(models):
        raise MergeConfigError(f"got {len(per_model)} model_params for {len(models)} models")
    method_params, resolved = build_params(spec, shared, defaults, per_model, [f"model{i}" for i in range(len(models))], name)
    base_c = base.to(compute_dtype)
    deltas = torch.stack([m.to(compute_dtype) - base_c for m in models])
    group = TensorGroup(
        name=name, base=base_c, deltas=deltas, model_params=resolved,
        kind=kind or ("matrix" if base.dim() == 2 else "other"), has_base=has_base,
        model_stats=None if stats is None else tuple(
            ModelStatistic(s.to(compute_dtype), 0, float(s.double().norm())) for s in stats),
    )
    # a whole-model trim over this one tensor, exactly as merge_checkpoints' first pass computes it
    thresholds, _ = global_thresholds(spec, method_params, resolved, [group], lambda g: g.deltas, compute_dtype, base.device)
    if thresholds is not None:
        group = replace(group, trim_thresholds=thresholds)
    return base_c + run_stages(spec, group, method_params, seed)
