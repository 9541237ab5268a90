"""The tensor plan: which tensor goes where, checked before any work.

Each tensor of the base is classified (DRM config semantics, ``../shared/specs/drm.md`` §1.8;
regexes use ``re.match``, i.e. anchored at the start of the name):

* ``ignore``: matches an ``ignore`` regex, or is not floating point: kept at the base value;
* ``matrix``: 2-D, matches an ``include`` regex and no ``exclude`` regex: merged as a matrix;
* ``other``: everything else (1-D, embeddings, LM head, excluded 2-D): the method's other path.

Layer position ``t = layer / (num_layers - 1)`` drives mergekit-style gradients; tensors
outside the numbered layers get t = 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from merging.errors import CheckpointMismatchError, MergeConfigError

__all__ = ["LAYER_PATTERN", "TensorEntry", "build_plan", "check_same_tensors", "check_same_kinds", "classify"]

PlanKind = Literal["matrix", "other", "ignore"]
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
"""A numbered layer in a tensor name; group 1 is the layer index."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: PlanKind
    layer_t: float


def _compile(patterns: Iterable[str], key: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise MergeConfigError(f"invalid regex {p!r} in '{key}': {err}") from None
    return compiled


def classify(name: str, shape: tuple[int, ...], dtype: torch.dtype, include, exclude, ignore) -> PlanKind:
    if any(p.match(name) for p in ignore) or not dtype.is_floating_point:
        return "ignore"
    if len(shape) == 2 and any(p.match(name) for p in include) and not any(p.match(name) for p in exclude):
        return "matrix"
    return "other"


def build_plan(
    names_shapes_dtypes: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    include: Iterable[str],
    exclude: Iterable[str],
    ignore: Iterable[str],
    num_layers: int | None = None,
) -> tuple[TensorEntry, ...]:
    """Classify every base tensor; ``num_layers`` defaults to the highest layer index + 1."""
    inc, exc, ign = _compile(include, "include"), _compile(exclude, "exclude"), _compile(ignore, "ignore")
    items = list(names_shapes_dtypes)
    layers = {name: int(m.group(1)) for name, _, _ in items if (m := LAYER_PATTERN.search(name))}
    if num_layers is None:
        num_layers = max(layers.values()) + 1 if layers else 1
    beyond = [name for name, layer in layers.items() if layer >= num_layers]
    if beyond:
        raise CheckpointMismatchError(
            f"base tensor {beyond[0]!r} is in layer {layers[beyond[0]]} but the base's config.json says the model has "
            f"{num_layers} layers; the config does not belong to these weights (fix num_hidden_layers)")
    entries = []
    for name, shape, dtype in items:
        t = layers[name] / (num_layers - 1) if name in layers and num_layers > 1 else 0.0
        entries.append(TensorEntry(name, tuple(shape), dtype, classify(name, tuple(shape), dtype, inc, exc, ign), t))
    return tuple(entries)


def check_same_tensors(base: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]], model_name: str) -> None:
    """Raise ``CheckpointMismatchError`` naming the model, tensor and both shapes."""
    missing = [k for k in base if k not in model]
    if missing:
        raise CheckpointMismatchError(f"model {model_name!r} lacks tensor {missing[0]!r} of the base{_more(missing)}")
    extra = [k for k in model if k not in base]
    if extra:
        raise CheckpointMismatchError(f"model {model_name!r} has tensor {extra[0]!r} that the base lacks{_more(extra)}")
    for key, shape in base.items():
        if tuple(model[key]) != tuple(shape):
            raise CheckpointMismatchError(
                f"model {model_name!r}, tensor {key!r}: shape {tuple(model[key])} does not match the base's {tuple(shape)}"
            )


def check_same_kinds(base: Mapping[str, torch.dtype], model: Mapping[str, torch.dtype], model_name: str) -> None:
    """Raise ``CheckpointMismatchError`` when a tensor is floating point in one model and not
    in the other (e.g. float weights relabelled as integers in a file's header)."""
    for key, dtype in base.items():
        if model[key].is_floating_point != dtype.is_floating_point:
            raise CheckpointMismatchError(
                f"model {model_name!r}, tensor {key!r}: stored as {str(model[key]).removeprefix('torch.')} where the "
                f"base has {str(dtype).removeprefix('torch.')}; the file is corrupt or not a fine-tune of this base")


def _more(keys: list[str]) -> str:
    """The rest of a key-set mismatch message after its first key."""
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{more}; all models must be fine-tunes of the same base architecture"
