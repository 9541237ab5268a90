"""Layer slices (mergekit's ``slices:``): each output tensor as a merge of named input tensors.

A sliced config lists output slices; slice k merges, layer by layer, the layers
``[a_s, b_s)`` of each of its sources s (every source covers the same number of layers n_k).
The output's layers are the slices' layers in order, renumbered 0, 1, ...:

    output layer  j = offset_k + i     (i = 0 .. n_k - 1, offset_k = n_0 + ... + n_{k-1})
    inputs        layer a_s + i of every source s of slice k
    gradient t    i / (n_k - 1)        (t = 1 for a one-layer slice; per slice, as mergekit)

Tensors outside the numbered layers (mergekit's "pre" and "post" weights) keep their names and
t = 0: embeddings (``embed_tokens``, ``wte``, ...) merge the first slice's sources, every
other one (final norm, LM head) the last slice's. The reference theta_0 a tensor's deltas are
taken against is the slice's base model (the slice's ``base_model``, else the config's) when it
is one of the slice's sources, else (methods without a base) the slice's first source.

Parameters resolve per output tensor, highest first: the slice source's ``parameters``, the
slice's ``parameters``, the global ``parameters`` (mergekit 0.1.5's lookup order).
Everything here is pure: ``expand_slices`` takes each model's tensor names and shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from merging.config import MergeConfig, OutputSlice
from merging.errors import CheckpointMismatchError, MergeConfigError
from merging.plan import LAYER_PATTERN

__all__ = ["MappedTensor", "SliceGroup", "expand_slices", "expand_output_slices", "sliced_layer_count", "PRE_WEIGHT"]

PRE_WEIGHT = re.compile(r".*(embed_tokens|wte|wpe|word_embeddings|embed_positions|position_embeddings"
                        r"|token_type_embeddings|embed_in|patch_embed\w*|patch_conv|class_embedding|ln_pre"
                        r"|pre_layrnorm|embeddings\.\w+)\b")
"""Non-layer tensors that precede the layers (merged from the first slice's sources)."""


@dataclass(frozen=True)
class SliceGroup:
    """The models one output tensor merges: its reference and its inputs, with their parameters."""

    label: str  # where it is configured, for messages: "slices[1]", "modules.vision_tower.slices[0]"
    reference: str  # model the deltas are taken against
    inputs: tuple[str, ...]  # task models, in slice order
    parameters: Mapping[str, Any] = field(default_factory=dict)  # the slice's (over its module's) parameters
    model_parameters: tuple[Mapping[str, Any], ...] = ()  # per input


@dataclass(frozen=True)
class MappedTensor:
    """One output tensor: ``reference`` and ``inputs`` are (model, tensor name) pairs."""

    name: str
    shape: tuple[int, ...]
    reference: tuple[str, str]
    inputs: tuple[tuple[str, str], ...]
    group: SliceGroup
    layer_t: float


def sliced_layer_count(slices: tuple[OutputSlice, ...]) -> int:
    """The output's number of layers: the sum of the slices' lengths."""
    return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices)


def _group(out: OutputSlice, label: str, base: str | None, method: str, needs_base: bool,
           parameters: Mapping[str, Any], base_is_input: bool) -> SliceGroup:
    refs = [s.model for s in out.sources]
    base = out.base_model or base
    if base is not None and base in refs:
        reference = base
    elif needs_base:
        raise MergeConfigError(f"{label}: method {method!r} needs its base model {base!r} among the slice's sources; "
                               "add it with the slice's layer_range"
                               if base else f"method {method!r} needs base_model; add 'base_model: <path>'")
    else:
        reference = refs[0]
    inputs = [s for s in out.sources if base_is_input or s.model != base]
    return SliceGroup(label, reference, tuple(s.model for s in inputs), {**parameters, **out.parameters},
                      tuple(dict(s.parameters) for s in inputs))


def _layers(shapes: Mapping[str, tuple[int, ...]]) -> dict[int, dict[str, tuple[str, tuple[int, ...]]]]:
    """Per layer index: {name with the index replaced by '{}': (name, shape)}."""
    found: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for name, shape in shapes.items():
        m = LAYER_PATTERN.search(name)
        if m:
            template = name[: m.start(1)] + "{}" + name[m.end(1):]
            found.setdefault(int(m.group(1)), {})[template] = (name, tuple(shape))
    return found


def expand_slices(config: MergeConfig, base_ref: str, needs_base: bool,
                  shapes_of: Callable[[str], Mapping[str, tuple[int, ...]]],
                  layers_of: Callable[[str], int], base_is_input: bool = False) -> list[MappedTensor]:
    """Every output tensor of a sliced ``config`` in output order (pre weights, layers, post
    weights). ``shapes_of(model)`` gives a model's tensor shapes, ``layers_of(model)`` its
    number of layers; ``base_ref`` is the model whose non-layer tensors the output has."""
    return expand_output_slices(config.slices, config.base_model, config.merge_method, base_ref, needs_base,
                                shapes_of, layers_of, base_is_input=base_is_input)


def expand_output_slices(slices: tuple[OutputSlice, ...], base_model: str | None, method: str, base_ref: str,
                         needs_base: bool, shapes_of: Callable[[str], Mapping[str, tuple[int, ...]]],
                         layers_of: Callable[[str], int], where: str = "slices",
                         parameters: Mapping[str, Any] | None = None, base_is_input: bool = False) -> list[MappedTensor]:
    """``expand_slices`` for one list of output slices configured at ``where`` (a module's
    slices: ``shapes_of`` then gives the module's tensors only), ``parameters`` under the
    slices' own. The base, when a slice lists it, is the reference of its deltas and (unless
    ``base_is_input``: methods whose base is one more input) not an input."""
    groups = [_group(out, f"{where}[{k}]", base_model, method, needs_base, parameters or {}, base_is_input)
              for k, out in enumerate(slices)]
    layer_maps = {ref: _layers(shapes_of(ref)) for ref in dict.fromkeys(s.model for sl in slices for s in sl.sources)}
    for k, out in enumerate(slices):
        for j, source in enumerate(out.sources):
            count = layers_of(source.model)
            if source.layer_range[1] > count:
                raise MergeConfigError(f"{where}[{k}].sources[{j}].layer_range {list(source.layer_range)} is outside "
                                       f"model {source.model!r}, which has {count} layers")
    tensors: list[MappedTensor] = []
    outside = [(n, tuple(s)) for n, s in shapes_of(base_ref).items() if not LAYER_PATTERN.search(n)]
    for name, shape in outside:
        if PRE_WEIGHT.match(name):
            tensors.append(_outside(name, shape, groups[0], shapes_of))
    offset = 0
    for k, out in enumerate(slices):
        length = out.sources[0].layer_range[1] - out.sources[0].layer_range[0]
        group = groups[k]
        starts = {s.model: s.layer_range[0] for s in out.sources}
        for i in range(length):
            t = i / (length - 1) if length > 1 else 1.0
            ref_layer = layer_maps[group.reference].get(starts[group.reference] + i, {})
            for template, (ref_name, shape) in ref_layer.items():
                inputs = []
                for model in group.inputs:
                    found = layer_maps[model].get(starts[model] + i, {}).get(template)
                    if found is None or found[1] != shape:
                        what = "lacks" if found is None else f"has shape {found[1]} for"
                        raise CheckpointMismatchError(
                            f"{where}[{k}]: model {model!r} {what} tensor {template.format(starts[model] + i)!r} "
                            f"(model {group.reference!r} has {ref_name!r} of shape {shape}); the slice's models must "
                            "share one architecture")
                    inputs.append((model, found[0]))
                tensors.append(MappedTensor(template.format(offset + i), shape, (group.reference, ref_name),
                                            tuple(inputs), group, t))
        offset += length
    for name, shape in outside:
        if not PRE_WEIGHT.match(name):
            tensors.append(_outside(name, shape, groups[-1], shapes_of))
    return tensors


def _outside(name: str, shape: tuple[int, ...], group: SliceGroup,
             shapes_of: Callable[[str], Mapping[str, tuple[int, ...]]]) -> MappedTensor:
    """A tensor outside the layers, merged from ``group``'s models under its own name."""
    for model in (group.reference, *group.inputs):
        found = shapes_of(model).get(name)
        if found is None or tuple(found) != shape:
            what = "lacks" if found is None else f"has shape {tuple(found)} for"
            raise CheckpointMismatchError(f"model {model!r} {what} tensor {name!r} (the output's has shape {shape}); "
                                          "the slices' models must share one architecture")
    return MappedTensor(name, shape, (group.reference, name), tuple((m, name) for m in group.inputs), group, 0.0)
