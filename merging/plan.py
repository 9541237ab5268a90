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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from merging.errors import CheckpointMismatchError, MergeConfigError

__all__ = ["LAYER_PATTERN", "TensorEntry", "build_plan", "check_same_tensors", "check_same_kinds", "classify", "find_tied",
           "reconcile_tied_copies", "same_values"]

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
    """Classify every base tensor and place it in its layer stack (``layer_t``).

    A model may hold several stacks of numbered layers (T5's ``encoder.block.*`` and
    ``decoder.block.*``, a multi-modal model's text and vision layers): each tensor's gradient
    position is t = i / (n - 1) within its own stack of n layers, as mergekit's per-module
    plans give; tensors outside the layers have t = 0. ``num_layers`` (config.json's count)
    checks a single stack; without it, or with several stacks, each stack has its highest
    index + 1 layers."""
    inc, exc, ign = _compile(include, "include"), _compile(exclude, "exclude"), _compile(ignore, "ignore")
    items = list(names_shapes_dtypes)
    layers: dict[str, tuple[str, int]] = {}
    for name, _, _ in items:
        if m := LAYER_PATTERN.search(name):
            layers[name] = (name[: m.start(1)], int(m.group(1)))
    counts: dict[str, int] = {}
    for stack, index in layers.values():
        counts[stack] = max(counts.get(stack, 0), index + 1)
    if num_layers is not None and len(counts) <= 1:
        beyond = [name for name, (_, index) in layers.items() if index >= num_layers]
        if beyond:
            raise CheckpointMismatchError(
                f"base tensor {beyond[0]!r} is in layer {layers[beyond[0]][1]} but the base's config.json says the model "
                f"has {num_layers} layers; the config does not belong to these weights (fix num_hidden_layers)")
        counts = dict.fromkeys(counts, num_layers)
    entries = []
    for name, shape, dtype in items:
        stack, index = layers.get(name, ("", 0))
        count = counts.get(stack, 1)
        t = index / (count - 1) if name in layers and count > 1 else 0.0
        entries.append(TensorEntry(name, tuple(shape), dtype, classify(name, tuple(shape), dtype, inc, exc, ign), t))
    return tuple(entries)


TIE_CANDIDATE = re.compile(r"(?:^|.*\.)(shared|embed_tokens|lm_head|word_embeddings|wte|embed_in|embed_out)\.weight$")
"""Tensors a checkpoint may store more than once as one tied parameter (T5 v1.1 saves
``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens`` with equal values)."""


def find_tied(shapes: Mapping[str, tuple[int, ...]], same: Callable[[str, str], bool]) -> dict[str, str]:
    """Tied copies among the embedding-like tensors: ``{copy: the first name of its group}``,
    where ``same(a, b)`` says two names hold equal values in the base and every input. Copies
    of one parameter then draw the same random numbers (the generator of the first name), so a
    random method keeps them equal, as the model that ties them expects."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, shape in shapes.items():
        if TIE_CANDIDATE.match(name):
            by_shape.setdefault(tuple(shape), []).append(name)
    tied: dict[str, str] = {}
    for names in by_shape.values():
        for i, name in enumerate(names):
            if name in tied:
                continue
            for other in names[i + 1:]:
                if other not in tied and same(name, other):
                    tied[other] = name
    return tied


def same_values(reader: Any, a: str, b: str) -> bool:
    """Whether tensors ``a`` and ``b`` of ``reader`` (a ``CheckpointReader``) hold equal values:
    the dtypes, then the first rows (which tell apart nearly every pair of different tensors),
    then the whole tensors."""
    if reader.dtype(a) != reader.dtype(b):
        return False
    first, second = reader.get(a), reader.get(b)
    return first.shape == second.shape and torch.equal(first[:1], second[:1]) and torch.equal(first, second)


def reconcile_tied_copies(base_tied: Mapping[str, str], base_names: Iterable[str], reader: Any) -> None:
    """Make ``reader`` (a ``CheckpointReader``) store tied parameters as the base does: a tied
    copy the base stores but the model lacks is served from the model's copy of the same
    parameter (``reader.alias``); an embedding-like tensor the model stores but the base lacks
    is left out when it equals one the base stores (``reader.hide``). Anything else is left for
    ``check_same_tensors`` to report."""
    groups: dict[str, list[str]] = {}
    for copy, first in base_tied.items():
        groups.setdefault(first, [first]).append(copy)
    for members in groups.values():
        present = [n for n in members if n in reader]
        for name in members:
            if present and name not in reader:
                reader.alias(name, present[0])
    base_names = set(base_names)
    for extra in [n for n in reader.keys() if n not in base_names and TIE_CANDIDATE.match(n)]:
        twins = [n for n in base_names if n in reader and TIE_CANDIDATE.match(n) and reader.shape(n) == reader.shape(extra)]
        if any(same_values(reader, extra, n) for n in twins):
            reader.hide(extra)


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
