"""The context of a merge: every input opened and checked before any tensor is merged.

``MergeContext`` resolves and opens every model (checking names and shapes against the base),
builds the tensor plan, validates the parameters of every tensor, and hands the stage
functions (``merging.stages``) what they need per tensor group: the base tensor on the
compute device and dtype, the deltas, the resolved parameters and the first-pass thresholds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from merging.api import check_model_count
from merging.config import MergeConfig, ModelEntry
from merging.errors import MergeConfigError, NonFiniteDeltaError
from merging.io.adapter_writer import adapter_contents
from merging.io.checkpoint import CheckpointReader
from merging.io.files import model_file, read_json_object
from merging.io.sources import (
    AdapterSource,
    FullModelSource,
    ModelSource,
    is_adapter_folder,
    open_source,
    resolve_folder,
)
from merging.kernels.core_space import CoreSpace, project_to_core
from merging.kernels.knots import KnotsMatrix
from merging.kernels.knots import decompose_matrix as knots_decompose
from merging.model_stats import ModelStats
from merging.modules import assign_modules, expand_modules, layer_count_key, module_layer_count
from merging.plan import (
    LAYER_PATTERN,
    TensorEntry,
    build_plan,
    check_same_kinds,
    check_same_tensors,
    find_tied,
    reconcile_tied_copies,
    same_values,
)
from merging.registry import get_method
from merging.resolve import build_params, split_global_parameters
from merging.slices import MappedTensor, expand_slices, sliced_layer_count
from merging.spec import LoraFactors, MethodSpec, TensorGroup
from merging.tokenizer_merge import VOCAB_TENSOR, Vocabulary, align_rows, build_vocabulary, needs_vocabulary

__all__ = ["MergeContext", "resolve_device", "reproducible_threads", "all_finite", "DTYPES"]

log = logging.getLogger(__name__)

KNOTS_MIN_SINGULAR_VALUE = 1e-5
"""KnOTS keeps the singular triplets above this absolute value (the reference's cut)."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeConfigError("device: cuda was asked for but no CUDA device is available; use cpu or auto")
    return torch.device(device)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or Inf: one min/max reduction (a NaN propagates through
    it), about a tenth of the time of ``isfinite(tensor).all()``, which writes a mask as large
    as the tensor first."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


@contextlib.contextmanager
def reproducible_threads(device: torch.device) -> Iterator[None]:
    """Merge math on the CPU runs on one torch intra-op thread. Whole-tensor reductions (an
    L1 norm, a cosine) and MKL's LAPACK/BLAS split their work by the thread count, so the last
    bits of a norm, an SVD or a matrix product would depend on how many threads a machine
    has; with one thread the merged model does not. (CUDA kernels are not affected.)"""
    if device.type != "cpu":
        yield
        return
    with _THREADS_LOCK:  # merges may run concurrently in threads (partitions): the first sets, the last restores
        if _THREADS_HELD[0] == 0:
            _THREADS_HELD[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_HELD[0] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_HELD[0] -= 1
            if _THREADS_HELD[0] == 0:
                torch.set_num_threads(_THREADS_HELD[1])


_THREADS_LOCK = threading.Lock()
_THREADS_HELD = [0, 1]  # merges running on the CPU, the thread count to restore


class _LastPerThread(threading.local):
    """The last base tensor, aligned token rows, Core Space and KnOTS basis a thread asked for:
    every stage of a group asks again, and groups may be merged in several threads at once."""

    def __init__(self) -> None:  # run once in each thread that uses it
        self.clear()

    def clear(self) -> None:
        self.base: tuple[str | None, torch.Tensor | None] = (None, None)
        self.aligned: tuple[str | None, dict[str, torch.Tensor] | None] = (None, None)
        self.core: tuple[str | None, CoreSpace | None] = (None, None)
        self.knots: tuple[str | None, KnotsMatrix | None] = (None, None)


class MergeContext:
    """Everything opened and checked before any tensor is merged, and the per-group views.
    Safe to use from several threads, one tensor group per thread at a time."""

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.spec: MethodSpec = get_method(config.merge_method)
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.compute_dtype]
        self.out_dtype_name = config.out_dtype or config.dtype
        self.thresholds: tuple[torch.Tensor | None, frozenset] = (None, frozenset())  # sparsify's first pass
        self._last = _LastPerThread()  # what the stages of the group a thread is merging ask for again
        self.mapped: dict[str, MappedTensor] | None = None  # sliced configs: each output tensor's inputs
        self.out_layers: int | dict[str, int] | None = None  # output layer count(s) when slices change them
        self.vocabulary: Vocabulary | None = None  # a tokenizer merge's output vocabulary
        self._base_tied: dict[str, str] = {}  # tied copies the base stores: copy -> first name
        if config.slices is not None or config.modules is not None:
            self._open_slices(config)
        else:
            self._open_models(config)
        self.tied = self._find_tied()
        self._param_cache: dict[Any, Any] = {}
        for entry in self.plan:  # validate every tensor's parameters before any work
            if entry.kind != "ignore":
                self.params_for(entry)
        self._check_core_space()
        # out_format: peft of LoRA adapters (no whole tensors) merged in their span: the result is a
        # function of the deltas alone, so the base gives shapes only (it may be header-only) and is never read
        self.base_values_unused = (
            config.out_format == "peft" and all(isinstance(s, AdapterSource) and not adapter_contents(s.adapter).full
                                                for s in self.sources)
            and all(self.spec.keeps_lora_span(self.params_for(e)[0]) for e in self.merged_entries()))
        if self.base_values_unused:  # a tensor no adapter touches has zero deltas, a zero merged delta: not in the adapter
            self.plan = tuple(replace(e, kind="ignore") if not any(s.adapter.touches(e.name) for s in self.sources) else e
                              for e in self.plan)
        self.stats = _load_stats(config.stats) if config.stats else None
        self.model_stats = None if self.spec.model_stats is None else ModelStats(  # RegMean's Grams, Fisher: per model
            self.spec.name, self.spec.model_stats, self.model_names, self.merged_entries(), lambda e: self.params_for(e)[1])
        if self.spec.uses_stats and self.stats is None:
            log.warning("%s: no activation statistics given (create them with 'mergeflow collect-stats' and set "
                        "'stats: FILE'); running unscaled", self.spec.name)

    def _open_models(self, config: MergeConfig) -> None:
        """Whole models (``models:``): every input's tensors are the base's."""
        refs = [m.model for m in config.models]
        base_ref = config.base_model
        if base_ref is None:  # the first model is the reference; every listed model an input
            if self.spec.needs_base:
                raise MergeConfigError(f"method {self.spec.name!r} needs base_model; add 'base_model: <path>'")
            base_ref, entries = refs[0], list(config.models)
        elif self.spec.base == "input":  # the base is an input (mergekit: an unlisted one is added)
            entries = list(config.models)
            if not config.base_is_reference and base_ref not in refs:
                entries.append(ModelEntry(model=base_ref))
        else:  # required / optional: the base is the reference, never an input
            entries = [m for m in config.models if m.model != base_ref]
        check_model_count(self.spec, len(entries))
        self.has_base = config.base_model is not None
        self.base_ref = base_ref
        self.base_folder = resolve_folder(base_ref)
        self.base = CheckpointReader(self.base_folder, name=base_ref, allow_pickle=config.allow_pickle,
                                     shapes_only=config.out_format == "peft")
        base_shapes = self.base.shapes()
        self.entries = entries
        read_dtype = DTYPES[config.dtype] if config.dtype else None
        self.sources: list[ModelSource] = [
            open_source(m.model, self.base_folder, base_shapes, config.allow_pickle, read_dtype) for m in entries
        ]
        self.vocabulary = self._build_vocabulary(config, [s.name for s in self.sources])
        self._base_tied = {} if config.out_format == "peft" else find_tied(  # (an adapter output's base may be header-only)
            base_shapes, lambda a, b: same_values(self.base, a, b))
        for source in self.sources:
            if isinstance(source, FullModelSource):
                reconcile_tied_copies(self._base_tied, base_shapes, source.reader)
                check_same_tensors(self._masked(base_shapes), self._masked(source.shapes()), source.name)
                check_same_kinds(self.base.dtypes(), source.reader.dtypes(), source.name)
        self.model_names = [m.model for m in entries]
        self.shared, self.model_defaults = split_global_parameters(self.spec, config.parameters)
        num_layers = _num_layers(self.base_folder, f"base model {base_ref!r}")
        self.plan: tuple[TensorEntry, ...] = build_plan(
            ((k, self._out_shape(k, self.base.shape(k)), self.base.dtype(k)) for k in self.base.keys()),
            config.include, config.exclude, config.ignore, num_layers,
        )

    def _open_slices(self, config: MergeConfig) -> None:
        """``slices:`` (or ``modules:``, each module its own models or slices): every output
        tensor merges named tensors of the slices' models (``merging.slices``,
        ``merging.modules``); the base (else the first model) gives the non-layer tensors,
        config and tokenizer."""
        what = "modules" if config.modules is not None else "slices"
        if config.out_format == "peft":
            raise MergeConfigError(f"{what}: out_format: peft is not available with {what}; use out_format: hf")
        refs = [m.model for m in config.models]
        self.has_base = config.base_model is not None
        self.base_ref = config.base_model or refs[0]
        self.base_folder = resolve_folder(self.base_ref)
        read_dtype = DTYPES[config.dtype] if config.dtype else None
        self._by_ref: dict[str, FullModelSource] = {}
        for ref in dict.fromkeys([self.base_ref, *refs]):
            folder = resolve_folder(ref)
            if is_adapter_folder(folder) or "+" in ref and not Path(ref).exists():
                raise MergeConfigError(f"{what}: model {ref!r} is a LoRA adapter; {what} take full models (merge the "
                                       "adapter into its base first)")
            self._by_ref[ref] = FullModelSource(ref, CheckpointReader(folder, name=ref, allow_pickle=config.allow_pickle),
                                                read_dtype)
        self.base = self._by_ref[self.base_ref].reader
        self.entries = []
        self.sources = [self._by_ref[r] for r in refs if r != self.base_ref]
        self.model_names = [s.name for s in self.sources]
        self.shared, self.model_defaults = split_global_parameters(self.spec, config.parameters)
        readers = {ref: source.reader for ref, source in self._by_ref.items()}
        self.vocabulary = self._build_vocabulary(config, refs)
        base_is_input = self.spec.base == "input"
        if config.modules is not None:
            mapped, module_layers = expand_modules(config, self.base_ref, self.spec.needs_base, base_is_input,
                                                   lambda r: self._masked(readers[r].shapes()))
            self.out_layers = self._module_layer_keys(module_layers)
            plan_layers = max(module_layers.values(), default=0) or None
        else:
            mapped = expand_slices(config, self.base_ref, self.spec.needs_base,
                                   lambda r: self._masked(readers[r].shapes()), lambda r: _layer_count(readers[r], r),
                                   base_is_input)
            self.out_layers = plan_layers = sliced_layer_count(config.slices)
        for group in {m.group.label: m.group for m in mapped}.values():
            try:
                check_model_count(self.spec, len(group.inputs))
            except MergeConfigError as err:
                raise MergeConfigError(f"{group.label}: {err}") from None
        self.mapped = {m.name: m for m in mapped}
        planned = build_plan(((m.name, self._out_shape(m.name, m.shape), readers[m.reference[0]].dtype(m.reference[1]))
                              for m in mapped),
                             config.include, config.exclude, config.ignore, plan_layers)
        self.plan = tuple(replace(e, layer_t=self.mapped[e.name].layer_t) for e in planned)

    def _module_layer_keys(self, module_layers: dict[str, int]) -> dict[str, int]:
        """config.json keys of the modules' layer counts (dotted paths) with the output's counts;
        a module whose count changes but that has no such key is an error."""
        owner = f"base model {self.base_ref!r}"
        path = model_file(self.base_folder, "config.json", owner, required=False)
        base_config = read_json_object(path, owner) if path is not None else {}
        base_tensors = assign_modules(self.base.keys(), list(module_layers), owner)
        keys: dict[str, int] = {}
        for module, count in module_layers.items():
            key = layer_count_key(base_config, module)
            if key is not None:
                keys[key] = count
            elif module_layer_count(dict.fromkeys(base_tensors[module])) != count:
                raise MergeConfigError(f"modules.{module}: its layer count changes to {count} but the base's config.json "
                                       "has no key for it; merge the module with 'models'")
        return keys

    def _find_tied(self) -> dict[str, str]:
        """Copies of one tied parameter stored under several names (``merging.plan.find_tied``):
        equal in the base (``_base_tied``) and in every full-model input."""
        readers = [s.reader for s in self.sources if isinstance(s, FullModelSource)]
        return {copy: first for copy, first in self._base_tied.items()
                if all(same_values(r, copy, first) for r in readers)}

    def rng_name(self, name: str) -> str:
        """The name whose per-tensor generator a tensor draws from: its own, or for a tied copy
        the first name of its parameter (so random methods keep tied copies equal)."""
        return self.tied.get(name, name)

    def _build_vocabulary(self, config: MergeConfig, refs: list[str]) -> Vocabulary | None:
        """The output vocabulary of a tokenizer merge (``merging.tokenizer_merge``); None when the
        base's tokenizer is copied as it is."""
        full = [s for s in self.sources if isinstance(s, FullModelSource)]
        differ = config.tokenizer_source == "base" and any(
            s.reader.shape(k)[0] != self.base.shape(k)[0] for s in full for k in self.base.keys()
            if VOCAB_TENSOR.match(k) and k in s.reader)
        if not (needs_vocabulary(config) or differ):
            return None
        adapters = [s.name for s in self.sources if isinstance(s, AdapterSource)]
        if adapters:
            raise MergeConfigError(f"tokenizer_source: {config.tokenizer_source} aligns full models' embeddings, but "
                                   f"model {adapters[0]!r} is a LoRA adapter; merge it into its base first")
        names = list(dict.fromkeys([self.base_ref, *refs]))
        return build_vocabulary(config.tokenizer_source, self.base_ref, names, {r: resolve_folder(r) for r in names},
                                list(config.tokens), config.pad_to_multiple_of)

    def _masked(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Shapes to compare across models: token tensors' rows are aligned later, so not compared."""
        if self.vocabulary is None:
            return dict(shapes)
        return {k: (-1, *s[1:]) if VOCAB_TENSOR.match(k) else tuple(s) for k, s in shapes.items()}

    def _out_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.vocabulary is not None and VOCAB_TENSOR.match(name):
            return (self.vocabulary.rows, *shape[1:])
        return tuple(shape)

    def _aligned(self, name: str) -> dict[str, torch.Tensor] | None:
        """A token tensor of every model of ``name`` with its rows in the output vocabulary's
        order (None for other tensors, or without a tokenizer merge); the last one is kept."""
        if self.vocabulary is None or not VOCAB_TENSOR.match(name):
            return None
        if self._last.aligned[0] != name:
            if self.mapped is not None:
                pairs = [*self.mapped[name].inputs, self.mapped[name].reference]
                readers = {ref: self._by_ref[ref].reader for ref, _ in pairs}
            else:
                pairs = [*((s.name, name) for s in self.sources), (self.base_ref, name)]
                readers = {self.base_ref: self.base, **{s.name: s.reader for s in self.sources}}
            raw = {}
            for ref, key in pairs:
                tensor = readers[ref].get(key)
                raw[ref] = tensor.to(DTYPES[self.config.dtype]) if self.config.dtype else tensor
            self._last.aligned = (name, align_rows(raw, self.vocabulary, self.config.tokens, self.config.base_model))
        return self._last.aligned[1]

    def _check_core_space(self) -> None:
        """``merge_space: core`` needs LoRA inputs and a per-tensor trim."""
        if any(self.space_of(e) == "knots" for e in self.merged_entries()) and not self.has_base:
            raise MergeConfigError("merge_space: knots needs base_model (it decomposes the task deltas)")
        core = [e for e in self.merged_entries() if self.in_core_space(e)]
        if not core:
            return
        full = [s.name for s in self.sources if not isinstance(s, AdapterSource)]
        if full:
            raise MergeConfigError(f"merge_space: core merges LoRA adapters in their Core Space, but model {full[0]!r} is "
                                   "a full fine-tune; use merge_space: full, or give its LoRA adapter")
        params = self.params_for(core[0])[0]
        if self.spec.global_trim is not None and self.spec.global_trim(params) is not None:
            raise MergeConfigError("trim_scope: model is not available with merge_space: core (cores are trimmed per "
                                   "matrix); use trim_scope: tensor")

    def params_for(self, entry: TensorEntry):
        """(method params, per-model params) for one tensor, cached by resolved values."""
        key = (entry.name, entry.layer_t)
        if key not in self._param_cache:
            if self.mapped is not None:
                group = self.mapped[entry.name].group
                try:
                    shared, defaults = split_global_parameters(self.spec, group.parameters)
                    self._param_cache[key] = build_params(
                        self.spec, {**self.shared, **shared}, {**self.model_defaults, **defaults},
                        group.model_parameters, group.inputs, entry.name, entry.layer_t)
                except MergeConfigError as err:
                    raise MergeConfigError(f"{group.label}: {err}") from None
            else:
                self._param_cache[key] = build_params(
                    self.spec, self.shared, self.model_defaults, [m.parameters for m in self.entries],
                    self.model_names, entry.name, entry.layer_t,
                )
        return self._param_cache[key]

    def release_group(self) -> None:
        """Drop what the calling thread kept for its last group (its base tensor, ...): called
        when a group is done, so the next one does not start with it still in memory."""
        self._last.clear()

    def merged_entries(self) -> list[TensorEntry]:
        """Plan entries the method merges, in plan order."""
        return [e for e in self.plan if e.kind != "ignore"]

    def all_entries(self) -> list[TensorEntry]:
        """Every tensor of the output, in the base's file order (sliced: the output's layer order)."""
        if self.mapped is not None:
            return list(self.plan)
        return sorted(self.plan, key=lambda e: self.base.file_of(e.name))

    def raw_base(self, name: str) -> torch.Tensor:
        """The reference tensor of output tensor ``name`` as stored (sliced: the slice's reference
        model's; token tensors of a tokenizer merge: aligned to the output vocabulary)."""
        aligned = self._aligned(name)
        if aligned is not None:
            return aligned[self.mapped[name].reference[0] if self.mapped is not None else self.base_ref]
        if self.mapped is not None:
            model, key = self.mapped[name].reference
            return self._by_ref[model].reader.get(key)
        return self.base.get(name)

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base tensor (read in ``dtype`` when set) on the compute device and dtype; the
        last one is kept, since every stage of a tensor group asks for it."""
        if self._last.base[0] != name:
            raw = torch.zeros(self.base.shape(name), dtype=self.dtype) if self.base_values_unused else self.raw_base(name)
            if self.config.dtype:
                raw = raw.to(DTYPES[self.config.dtype])
            self._last.base = (name, raw.to(device=self.device, dtype=self.dtype))
        return self._last.base[1]

    def deltas(self, entry: TensorEntry) -> torch.Tensor:
        """theta_t - theta_0 of every input, stacked: (T, *shape); NaN or Inf is an error."""
        base = self.base_tensor(entry.name)
        if self.mapped is not None:
            inputs = [(self._by_ref[model], key) for model, key in self.mapped[entry.name].inputs]
        else:
            inputs = [(source, entry.name) for source in self.sources]
        deltas = torch.empty((len(inputs), *base.shape), dtype=base.dtype, device=base.device)
        aligned = self._aligned(entry.name)
        for t, (source, key) in enumerate(inputs):
            in_place = False
            if aligned is not None:
                d = aligned[source.name].to(device=base.device, dtype=base.dtype) - base
            elif isinstance(source, FullModelSource):  # converted and subtracted in its slot: no temporaries
                d = source.delta(key, base, out=deltas[t])
                in_place = True
            else:
                d = source.delta(key, base)
            if d is None:
                deltas[t].zero_()
                continue
            if not all_finite(d):
                raise NonFiniteDeltaError(
                    f"model {source.name!r}, tensor {entry.name!r}: the delta to the base holds NaN or Inf; "
                    "the checkpoint is corrupt or was saved from a diverged run"
                )
            if not in_place:
                deltas[t] = d
        return deltas

    def space_of(self, entry: TensorEntry) -> str:
        """Where the method runs on this tensor: ``full``, ``core`` or ``knots`` (matrices only)."""
        return getattr(self.params_for(entry)[0], "merge_space", "full") if entry.kind == "matrix" else "full"

    def in_core_space(self, entry: TensorEntry) -> bool:
        """Whether the method runs on this tensor's Core Space (``merge_space: core``)."""
        return self.space_of(entry) == "core"

    def knots_space(self, entry: TensorEntry, lora: LoraFactors | None = None,
                    deltas: torch.Tensor | None = None) -> KnotsMatrix | None:
        """KnOTS basis U and representations X_t = diag(s) V_t^T of a matrix under
        ``merge_space: knots`` (None otherwise), from its LoRA factors or its dense deltas; the
        last one is kept, since every stage of a group asks for it."""
        if self.space_of(entry) != "knots":
            return None
        if self._last.knots[0] != entry.name:
            if lora is not None:
                space = knots_decompose(lora.b, lora.a, lora.scales, min_singular_value=KNOTS_MIN_SINGULAR_VALUE)
            else:
                t, n, m = deltas.shape
                u, s, vh = torch.linalg.svd(deltas.to(torch.float64).permute(1, 0, 2).reshape(n, t * m), full_matrices=False)
                k = int((s > KNOTS_MIN_SINGULAR_VALUE).sum())
                blocks = vh[:k].reshape(k, t, m).permute(1, 0, 2)  # (T, k, m)
                space = KnotsMatrix(u[:, :k], s[:k].reshape(1, k, 1) * blocks)
            self._last.knots = (entry.name, KnotsMatrix(space.basis.to(self.device), space.representations.to(self.device)))
        return self._last.knots[1]

    def core_space(self, entry: TensorEntry, lora: LoraFactors | None = None) -> CoreSpace | None:
        """The Core Space of a LoRA-adapted matrix under ``merge_space: core`` (None
        otherwise); the last one is kept, since every stage of a group asks for it."""
        if not self.in_core_space(entry):
            return None
        if self._last.core[0] != entry.name:
            lora = lora if lora is not None else self.lora_factors(entry)
            if lora is None:
                return None
            space = project_to_core(lora.b, lora.a, lora.scales, dtype=torch.float64)
            self._last.core = (entry.name, CoreSpace(space.u_ref.to(self.device), space.v_ref.to(self.device),
                                                     space.cores.to(self.device)))
        return self._last.core[1]

    def factored(self, entry: TensorEntry) -> bool:
        """Whether ``entry`` takes the LoRA factor route end to end (an adapter output of a method
        with ``combine_factors``, every input a pure LoRA product of the matrix, in full space):
        its deltas stage keeps only the factors, and combine gives the merged delta as factors."""
        if not (self.base_values_unused and entry.kind == "matrix" and self.spec.combine_factors is not None):
            return False
        if not self.spec.factors_when(self.params_for(entry)[0]) or self.space_of(entry) != "full":
            return False
        return all(s.adapter.is_lora_product(entry.name) for s in self.sources)

    def lora_factors(self, entry: TensorEntry) -> LoraFactors | None:
        """The inputs of a matrix as LoRA factors, when every input is an adapter touching it
        as a pure LoRA product (any full fine-tune, saved full tensor or untouched input:
        None, and the methods use the dense deltas)."""
        if entry.kind != "matrix" or not all(isinstance(s, AdapterSource) for s in self.sources):
            return None
        found = [s.factors(entry.name, self.dtype) for s in self.sources]
        if any(f is None for f in found):
            return None
        return LoraFactors(tuple(f[0] for f in found), tuple(f[1] for f in found), tuple(f[2] for f in found))

    def in_space(self, entry: TensorEntry, deltas: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, LoraFactors | None]:
        """(the task stack in the space the method runs in, the LoRA factors when it runs on them)
        from the deltas stage's tensors: the dense deltas, Core Space cores or KnOTS
        representations (no base tensor is read)."""
        lora = LoraFactors.from_tensors(deltas)
        stack = deltas.get("deltas")
        if stack is None:  # the factor route end to end (``factored``): a shape-only stack
            stack = torch.empty((len(self.sources), *entry.shape), dtype=self.dtype, device="meta")
        if lora is not None:
            lora = LoraFactors(tuple(b.to(self.device) for b in lora.b), tuple(a.to(self.device) for a in lora.a), lora.scales)
            if self.in_core_space(entry):
                stack, lora = self.core_space(entry, lora).cores.to(self.dtype), None
        if self.space_of(entry) == "knots":
            stack, lora = self.knots_space(entry, lora, stack).representations.to(self.dtype), None
        return stack, lora

    def group(self, entry: TensorEntry, deltas: Mapping[str, torch.Tensor], with_thresholds: bool = False) -> TensorGroup:
        """The group of ``entry`` from the deltas stage's tensors (dense deltas, and the LoRA
        factors when there are some)."""
        _, model_params = self.params_for(entry)
        values, kinds = self.thresholds
        stack, lora = self.in_space(entry, deltas)
        shape_only = stack.is_meta  # the factor route end to end: no dense delta, no base value
        return TensorGroup(
            name=entry.name, base=torch.empty(entry.shape, dtype=self.dtype, device="meta") if shape_only
            else self.base_tensor(entry.name), deltas=stack if shape_only else stack.to(self.device),
            model_params=model_params, kind=entry.kind, has_base=self.has_base,
            trim_thresholds=values if with_thresholds and entry.kind in kinds else None,
            stats=self.stats.get(entry.name) if self.stats is not None else None, lora=lora,
            model_stats=self.model_stats.for_tensor(entry, model_params) if self.model_stats is not None else None,
        )

    def input_folders(self) -> dict[str, Path]:
        """Every folder or file the merge reads, by how it is named in messages."""
        folders = {f"base {self.base_ref!r}": self.base_folder}
        for source in self.sources:
            folders[f"model {source.name!r}"] = source.reader.path if isinstance(source, FullModelSource) else source.adapter.path
        tokenizer = self.tokenizer_folder()
        if self.vocabulary is not None:
            for ref in self.vocabulary.originals:
                folders.setdefault(f"tokenizer of {ref!r}", resolve_folder(ref))
        if tokenizer is not None:
            folders[f"tokenizer source {self.config.tokenizer_source!r}"] = tokenizer
        if self.config.stats:
            folders[f"stats file {self.config.stats!r}"] = Path(self.config.stats)
        for path in self.model_stats.paths() if self.model_stats is not None else []:  # RegMean's, Fisher's: per model
            folders.setdefault(f"stats file {path!r}", Path(path))
        return folders

    def tokenizer_folder(self) -> Path | None:
        """Where the merged model's tokenizer files come from (``tokenizer_source``); None
        when ``copy_tokenizer`` is off (a tokenizer merge writes its tokenizer anyway, as mergekit does)."""
        if self.vocabulary is not None:
            return self.vocabulary.donor
        if not self.config.copy_tokenizer:
            return None
        source = self.config.tokenizer_source
        return self.base_folder if source in (None, "base") else resolve_folder(source)


def _num_layers(folder: Path, owner: str) -> int | None:
    config = model_file(folder, "config.json", owner, required=False)
    if config is None:
        return None
    data = read_json_object(config, owner)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int):
            return data[key]
    return None


def _layer_count(reader: CheckpointReader, ref: str) -> int:
    """A model's number of layers: its config.json's, else its highest layer index + 1."""
    count = _num_layers(reader.path, f"model {ref!r}") if reader.path.is_dir() else None
    if count is None:
        found = [int(m.group(1)) for k in reader.keys() if (m := LAYER_PATTERN.search(k))]
        count = max(found) + 1 if found else 0
    return count


def _load_stats(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise MergeConfigError(f"stats file {path} does not exist; create it with 'mergeflow collect-stats'")
    return load_file(path)
