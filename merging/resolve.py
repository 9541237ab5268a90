"""Resolving parameter settings per tensor, as mergekit accepts them.

A setting is a scalar, a gradient (a list of numbers, interpolated piecewise-linearly over
``t = layer_index / (num_layers - 1)``; tensors outside the layers use t = 0), or a list of
``{filter, value}`` pairs (first pair whose ``filter`` is a substring of the tensor name
wins; no filter or ``"*"`` is the fallback). Global ``parameters`` keys that name per-model
fields are defaults for every model; the rest are the method's shared params.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from merging.errors import MergeConfigError
from merging.spec import MethodSpec

__all__ = ["resolve_setting", "split_global_parameters", "build_params", "field_names"]

_MISSING = object()


def field_names(model: type[BaseModel]) -> set[str]:
    """Accepted keys of a params model (aliases where set, e.g. ``lambda``)."""
    return {info.alias or name for name, info in model.model_fields.items()}


def resolve_setting(setting: Any, tensor_name: str = "", t: float = 0.0) -> Any:
    """The scalar value of one setting for a tensor at layer position ``t`` in [0, 1]."""
    if isinstance(setting, Mapping) and "value" in setting:
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return _MISSING
        if all(isinstance(e, Mapping) for e in setting):
            for cond in setting:
                if "value" not in cond:
                    raise MergeConfigError(f"filtered setting {dict(cond)} has no 'value'; write {{filter: ..., value: ...}}")
                flt = cond.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise MergeConfigError(f"filtered setting {dict(cond)}: 'filter' must be a string (a substring of "
                                           f"tensor names), got {type(flt).__name__}")
                if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                    return resolve_setting(cond["value"], tensor_name, t)
            return _MISSING
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def split_global_parameters(spec: MethodSpec, parameters: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split global ``parameters`` into (shared method params, per-model defaults)."""
    method_keys, model_keys = field_names(spec.params), field_names(spec.model_params)
    shared, model_defaults = {}, {}
    for key, value in parameters.items():
        if key in model_keys:
            model_defaults[key] = value
        elif key in method_keys:
            shared[key] = value
        else:
            raise MergeConfigError(
                f"unknown parameter {key!r} for method {spec.name!r} in 'parameters'. "
                f"Valid: {', '.join(sorted(method_keys | model_keys))}"
            )
    return shared, model_defaults


def _validate(model: type[BaseModel], values: dict, where: str, method: str) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(
            f"{where}.{'.'.join(str(p) for p in e['loc']) or '(params)'}: {e['msg']}"
            + (f" (got {e['input']!r})" if e["loc"] else "")
            for e in err.errors()
        )
        raise MergeConfigError(f"invalid parameters for method {method!r}: {problems}") from None


def build_params(
    spec: MethodSpec,
    shared: Mapping[str, Any],
    model_defaults: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    model_names: Sequence[str],
    tensor_name: str = "",
    t: float = 0.0,
):
    """Validated (method params, per-model params tuple) for one tensor."""
    model_keys = field_names(spec.model_params)
    values = {k: v for k, v in ((k, resolve_setting(s, tensor_name, t)) for k, s in shared.items()) if v is not _MISSING}
    params = _validate(spec.params, values, "parameters", spec.name)
    models = []
    for index, (overrides, name) in enumerate(zip(per_model, model_names)):
        unknown = set(overrides) - model_keys
        if unknown:
            raise MergeConfigError(
                f"unknown parameter(s) {sorted(unknown)} for model {name!r} (models[{index}]) with method "
                f"{spec.name!r}. Valid per-model parameters: {', '.join(sorted(model_keys)) or '(none)'}"
            )
        merged = {**model_defaults, **overrides}
        resolved = {k: v for k, v in ((k, resolve_setting(s, tensor_name, t)) for k, s in merged.items()) if v is not _MISSING}
        models.append(_validate(spec.model_params, resolved, f"models[{index}] ({name}).parameters", spec.name))
    return params, tuple(models)
