"""Modules of multi-modal models (mergekit's ``modules:``): each module merged by its own config.

A multi-modal checkpoint (Mistral-3, Gemma-3, Qwen2-VL, Llama-4, LLaVA, ...) holds several
networks under tensor-name prefixes: a text decoder, a vision tower, a projector between them.
mergekit's ``modules:`` gives each module its own ``models`` or ``slices`` and ``parameters``:

    modules:
      text_decoder:  {slices: [...]}                     # layer ranges, as merging.slices
      vision_tower:  {models: [...], parameters: {...}}
      multi_modal_projector: {models: [...]}

A module's tensors are those whose name starts with one of its prefixes, the longest prefix
winning (``visual.merger.`` is the projector's, ``visual.`` the vision tower's). The module
names of mergekit 0.1.5's architectures have the prefixes below, which cover both the layout
transformers saves (``language_model.model.layers.*``) and the newer in-memory one
(``model.language_model.layers.*`` beside ``lm_head``); any other module name ``X`` stands for
``X.`` and ``model.X.``. Every tensor of the base must fall in a listed module: a module left out
would be missing from the output (mergekit writes such a model; mergeflow refuses, naming it).

Within a module:
- ``slices`` follow ``merging.slices``, the module's layers renumbered from 0;
- ``models`` are mergekit's one slice over every layer of the module of each listed model,
  with ``base_model`` appended when it is not listed (gradient position t = i / (n - 1) over the
  module's n layers; non-layer tensors t = 0).
Parameters resolve per tensor, highest first: slice source (or model entry), slice, module,
global (mergekit 0.1.5's order). The output config's layer count of each module
(``text_config.num_hidden_layers``, ``vision_config.num_hidden_layers`` / ``depth``) follows
the module's output layers (``layer_count_key``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

from merging.config import MergeConfig, OutputModule, OutputSlice, SliceSource
from merging.errors import MergeConfigError
from merging.plan import LAYER_PATTERN
from merging.slices import MappedTensor, expand_output_slices

__all__ = ["KNOWN_PREFIXES", "module_prefixes", "assign_modules", "expand_modules", "layer_count_key",
           "module_layer_count"]

KNOWN_PREFIXES: dict[str, tuple[str, ...]] = {
    "text_decoder": ("language_model.", "model.language_model.", "model.", "lm_head."),
    "vision_tower": ("vision_tower.", "model.vision_tower.", "visual.", "model.visual."),
    "vision_model": ("vision_model.", "model.vision_model."),
    "multi_modal_projector": ("multi_modal_projector.", "model.multi_modal_projector.", "visual.merger.",
                              "model.visual.merger.", "model.visual.deepstack_merger_list."),
}
"""Tensor-name prefixes of mergekit 0.1.5's module names."""

_SUB_CONFIG = {"text_decoder": "text_config", "vision_tower": "vision_config", "vision_model": "vision_config"}
_LAYER_KEYS = ("num_hidden_layers", "depth", "num_layers", "n_layer")


def module_prefixes(module: str) -> tuple[str, ...]:
    """The tensor-name prefixes of ``module``."""
    return KNOWN_PREFIXES.get(module, (f"{module}.", f"model.{module}."))


def assign_modules(names: Iterable[str], listed: Iterable[str], owner: str) -> dict[str, list[str]]:
    """The tensors of each listed module, in the order of ``names`` (the longest matching
    prefix among every known and listed module wins). A tensor in no listed module is an error
    naming it and, when it has one, its module."""
    listed = list(listed)
    prefixes = sorted({(p, m) for m in {*KNOWN_PREFIXES, *listed} for p in module_prefixes(m)},
                      key=lambda pm: -len(pm[0]))
    found: dict[str, list[str]] = {m: [] for m in listed}
    outside: dict[str, list[str]] = {}
    for name in names:
        module = next((m for p, m in prefixes if name.startswith(p)), None)
        if module in found:
            found[module].append(name)
        else:
            outside.setdefault(module or "", []).append(name)
    if outside:
        module, tensors = next(iter(outside.items()))
        where = f"module {module!r}, which 'modules' does not list" if module else "no module mergeflow knows"
        raise MergeConfigError(
            f"{owner}'s tensor {tensors[0]!r} ({len(tensors)} tensor(s)) belongs to {where}; the output would lack it. "
            f"List every module of the model under 'modules' (listed: {', '.join(listed)})")
    empty = [m for m, tensors in found.items() if not tensors]
    if empty:
        raise MergeConfigError(f"modules.{empty[0]}: {owner} has no tensor under the prefixes "
                               f"{', '.join(module_prefixes(empty[0]))}; check the module name")
    return found


def module_layer_count(shapes: Mapping[str, Any]) -> int:
    """A module's number of layers: its highest layer index + 1 (0 without layers)."""
    found = [int(m.group(1)) for name in shapes if (m := LAYER_PATTERN.search(name))]
    return max(found) + 1 if found else 0


def layer_count_key(config: Mapping[str, Any], module: str) -> str | None:
    """The dotted config.json key holding ``module``'s layer count (``text_config.num_hidden_layers``,
    ``vision_config.depth``, ...), or None when the config has none."""
    sub = _SUB_CONFIG.get(module)
    places = [(f"{sub}.", config.get(sub))] if sub and isinstance(config.get(sub), Mapping) else []
    if module == "text_decoder":
        places.append(("", config))
    for prefix, place in places:
        key = next((k for k in _LAYER_KEYS if isinstance(place.get(k), int)), None)
        if key is not None:
            return prefix + key
    return None


def _module_slices(module: OutputModule, base_model: str | None, layers_of: Callable[[str], int]) -> tuple[OutputSlice, ...]:
    """A ``models`` module as mergekit normalizes it: one slice over each model's every layer
    (base appended when given and not listed). Built without validation: a module without
    layers (a projector) has empty layer ranges, which a user's slice may not."""
    if module.slices:
        return module.slices
    entries = [(m.model, m.parameters) for m in module.models]
    if base_model is not None and base_model not in {ref for ref, _ in entries}:
        entries.append((base_model, {}))
    sources = tuple(SliceSource.model_construct(model=ref, layer_range=(0, layers_of(ref)), parameters=dict(params))
                    for ref, params in entries)
    return (OutputSlice.model_construct(sources=sources, base_model=None, parameters={}),)


def expand_modules(config: MergeConfig, base_ref: str, needs_base: bool, base_is_input: bool,
                   shapes_of: Callable[[str], Mapping[str, tuple[int, ...]]]) -> tuple[list[MappedTensor], dict[str, int]]:
    """Every output tensor of a ``modules`` config, module by module, and each module's output
    layer count. ``shapes_of(model)`` gives a model's tensor shapes."""
    listed = list(config.modules)
    split: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {}  # model -> module -> its tensors' shapes

    def module_shapes(module: str, ref: str) -> dict[str, tuple[int, ...]]:
        if ref not in split:
            shapes = shapes_of(ref)
            split[ref] = {m: {n: shapes[n] for n in names}
                          for m, names in assign_modules(shapes, listed, f"model {ref!r}").items()}
        return split[ref][module]

    mapped: list[MappedTensor] = []
    out_layers: dict[str, int] = {}
    for name, module in config.modules.items():
        shapes = partial(module_shapes, name)

        def layers(ref: str, shapes=shapes) -> int:
            return module_layer_count(shapes(ref))

        slices = _module_slices(module, config.base_model, layers)
        where = f"modules.{name}.slices" if module.slices else f"modules.{name}.models"
        mapped += expand_output_slices(slices, config.base_model, config.merge_method, base_ref, needs_base,
                                       shapes, layers, where, module.parameters, base_is_input=base_is_input)
        out_layers[name] = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices)
    return mapped, out_layers
