"""What a merge method is: a params model and up to three pure stage functions.

Stages, over one tensor group (one parameter tensor of the base and its T task deltas):

* ``decompose(group, params) -> Factors``: e.g. the joint SVD of DRM; identity by default;
* ``sparsify(group, factors, params, rng) -> Factors``: trim / drop / prune and sign election;
* ``combine(group, factors, params) -> Tensor``: the merged delta, before the ``lambda`` scale.

Factors are plain ``dict[str, Tensor]`` so that a pipeline can store them as safetensors.
Whole-model operations (TIES over the whole model, DRM's non-linear trim) declare a
``GlobalTrim``: the engine computes one magnitude threshold per model in a first pass and
hands it to ``sparsify`` as ``group.trim_thresholds``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from merging.params import MethodParams, ModelParams

__all__ = ["BaseRule", "Factors", "GlobalTrim", "LoraFactors", "MethodSpec", "ModelStatistic", "ModelStatsNeed", "TensorGroup",
           "TensorKind"]

Factors = dict[str, torch.Tensor]
TensorKind = Literal["matrix", "other"]
BaseRule = Literal["required", "optional", "input"]


@dataclass(frozen=True)
class LoraFactors:
    """Every task delta of one matrix as a LoRA product: ``deltas[t] = scales[t] * b[t] @ a[t]``
    (``b[t]`` (n, r_t), ``a[t]`` (r_t, m), ranks may differ). Given when every input of the
    matrix is a LoRA adapter touching it; methods with a factor route (``merging.kernels.
    factor_svd``, ``core_space``) use it instead of decomposing the dense stack."""

    b: tuple[torch.Tensor, ...]
    a: tuple[torch.Tensor, ...]
    scales: tuple[float, ...]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """As named tensors (a stage artifact stores them beside the dense deltas)."""
        out = {f"lora_b.{t}": b for t, b in enumerate(self.b)} | {f"lora_a.{t}": a for t, a in enumerate(self.a)}
        return out | {"lora_scales": torch.tensor(self.scales, dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> LoraFactors | None:
        if "lora_scales" not in tensors:
            return None
        scales = tensors["lora_scales"].tolist()
        return cls(tuple(tensors[f"lora_b.{t}"] for t in range(len(scales))),
                   tuple(tensors[f"lora_a.{t}"] for t in range(len(scales))), tuple(scales))


@dataclass(frozen=True)
class ModelStatistic:
    """One input model's statistic of one tensor, from that model's statistics file.

    Attributes:
        value: RegMean: the Gram (in, in) at the Linear's input; Fisher: the diagonal Fisher,
            the tensor's shape.
        tokens: N, the tokens ``value`` is a mean over (0 when unrecorded).
        model_norm: the L2 norm of the model's statistic over every tensor of the merge that
            needs one (Fisher's normalisation); 0 when not computed.
    """

    value: torch.Tensor
    tokens: int = 0
    model_norm: float = 0.0


@dataclass(frozen=True)
class ModelStatsNeed:
    """Per-model statistics a data-aware method reads (``models[].parameters.stats``).

    Attributes:
        kind: the statistics file kind (``merging.io.stats.STATS_KINDS``).
        tensor_kinds: plan kinds of the tensors that need a statistic from every model.
        how: how a user makes them (shown when a model has none).
        per_model: each model's statistic depends on that model and its data alone (RegMean,
            Fisher), cached per model and data; RegMean++'s Grams come through the partially
            merged model, a statistic of the whole recipe (collect_stats is then keyed by the
            merge settings too).
    """

    kind: str
    tensor_kinds: frozenset[str]
    how: str = ""
    per_model: bool = True


@dataclass(frozen=True)
class TensorGroup:
    """One parameter tensor to merge.

    Attributes:
        name: the tensor's key in the checkpoint.
        base: the base tensor, compute dtype, shape ``(*shape)``.
        deltas: task deltas ``theta_t - theta_0`` stacked, shape ``(T, *shape)``.
        model_params: one resolved per-model params object per task, in order.
        kind: ``"matrix"`` (merged as a 2-D matrix) or ``"other"`` (1-D, embeddings, ...).
        trim_thresholds: per-task magnitude thresholds from a whole-model first pass, if any.
        stats: optional per-tensor statistics (e.g. input activations for Scale-SVD).
        has_base: False when no ``base_model`` was given and ``base`` is only the reference
            model the deltas are taken against (linear, nuslerp without base).
        lora: the deltas as LoRA factors, when every input is a LoRA adapter of this matrix.
        model_stats: one statistic per task, in order, for methods with per-model statistics
            (``MethodSpec.model_stats``) and tensors that need them.
    """

    name: str
    base: torch.Tensor
    deltas: torch.Tensor
    model_params: tuple[ModelParams, ...]
    kind: TensorKind = "matrix"
    trim_thresholds: torch.Tensor | None = None
    stats: torch.Tensor | None = None
    has_base: bool = True
    lora: LoraFactors | None = None
    model_stats: tuple[ModelStatistic, ...] | None = None

    @property
    def num_models(self) -> int:
        return self.deltas.shape[0]


@dataclass(frozen=True)
class GlobalTrim:
    """A whole-model magnitude trim: per model, keep ``|delta| >= tau`` where ``tau`` is the
    ``kth_smallest(N, model_params)``-th smallest magnitude (1-based) over the N entries of the tensors of
    the listed kinds. ``kth_smallest`` returning 0 means keep everything."""

    kinds: frozenset[str]
    kth_smallest: Callable[[int, ModelParams], int]


def _identity_decompose(group: TensorGroup, params: MethodParams) -> Factors:
    return {"deltas": group.deltas}


def _identity_sparsify(group: TensorGroup, factors: Factors, params: MethodParams, rng: torch.Generator) -> Factors:
    return factors


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry (declarative, like mergekit 0.1.5's MergeMethodSpec + InputContract).

    Attributes:
        name: registry name (mergekit's where the method exists).
        params: the shared params model.
        model_params: the per-model params model.
        combine: the merged delta from the factors.
        decompose / sparsify: optional earlier stages (identity when absent).
        base: what ``base_model`` is to the method (mergekit 0.1.5's ``InputContract.base``, with
            ``merge_planner`` adding an unlisted base to the inputs):
            ``"required"`` (REQUIRED): it must be given; it is the reference the deltas are taken
            against and never an input, listed or not (ties, slerp, ...);
            ``"optional"`` (OPTIONAL): when given, the same, listed or not; without it the first
            model is the reference and every listed model an input (multislerp, nuslerp);
            ``"input"`` (IGNORED): an input, listed or not (an unlisted one is appended, as
            mergekit does), and the reference of the deltas (linear, karcher, passthrough);
            params.yaml's ``models.base`` sets ``base_is_reference``: then only the reference.
        min_models / max_models: bounds on the number of task models.
        random: whether the method draws random numbers (then ``seed`` matters).
        global_trim: whole-model trim declared by the params, if any.
        paper: citation shown in docs and the model card.
        uses_stats: reads per-tensor activation statistics (``group.stats``) when given.
        param_stages: which pipeline stage reads each parameter (``"decompose"`` or
            ``"sparsify"``); every parameter not listed is read by ``"combine"``. A changed
            parameter reruns its stage and the ones after it, never those before.
        lora_span: when every input is a LoRA adapter, the merged delta of each matrix they
            adapt stays in the span of their factors (column space of B_cat or row space of
            A_cat, rank <= sum of ranks) and depends on the deltas alone, so it is stored exactly
            as a LoRA adapter (``out_format: peft``). Any method run with ``merge_space: core``
            (or ``knots``: U X keeps the column space) does too (``keeps_lora_span``).
        model_stats: per-model statistics the method reads (RegMean's Grams, Fisher), each
            model's file named by its ``stats`` parameter; the engine hands them over as
            ``group.model_stats``.
        combine_factors: the merged delta (before lambda) of a matrix whose inputs are all LoRA
            products, as factors ``(b, a)`` with delta = b @ a, from ``group.lora`` and the
            earlier stages' factors alone; an adapter output (``out_format: peft``) then never
            forms an (n, m) matrix: the group's ``deltas`` and ``base`` are shape-only (meta)
            tensors there. Used when ``factors_when(params)`` holds.
        factors_when: whether ``combine_factors`` applies with these params (say, task
            arithmetic in full space, not in Core Space).
    """

    name: str
    params: type[MethodParams]
    combine: Callable[[TensorGroup, Factors, MethodParams], torch.Tensor]
    model_params: type[ModelParams] = ModelParams
    decompose: Callable[[TensorGroup, MethodParams], Factors] = _identity_decompose
    sparsify: Callable[[TensorGroup, Factors, MethodParams, torch.Generator], Factors] = _identity_sparsify
    base: BaseRule = "required"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    global_trim: Callable[[MethodParams], GlobalTrim | None] | None = None
    paper: str = ""
    param_stages: Mapping[str, str] = field(default_factory=dict)
    uses_stats: bool = False
    lora_span: bool = False
    model_stats: ModelStatsNeed | None = None
    combine_factors: Callable[[TensorGroup, Factors, MethodParams], tuple[torch.Tensor, torch.Tensor]] | None = None
    factors_when: Callable[[MethodParams], bool] = lambda params: True

    @property
    def needs_base(self) -> bool:
        """Whether ``base_model`` must be given (``base == "required"``)."""
        return self.base == "required"

    def keeps_lora_span(self, params: MethodParams) -> bool:
        """Whether the merge of LoRA adapters with ``params`` stays in their span (see ``lora_span``)."""
        return self.lora_span or getattr(params, "merge_space", "full") in ("core", "knots")

    def stage_of(self, key: str) -> str:
        """The pipeline stage that reads parameter ``key``."""
        return self.param_stages.get(key, "combine")

    @property
    def has_sparsify(self) -> bool:
        """Whether the method has a real (not identity) sparsify stage."""
        return self.sparsify is not _identity_sparsify

    @property
    def has_decompose(self) -> bool:
        """Whether the method has a real (not identity) decomposition stage."""
        return self.decompose is not _identity_decompose
