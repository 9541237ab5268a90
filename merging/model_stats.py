"""Per-model statistics of a merge (RegMean's Grams, Fisher), opened and checked before any tensor is merged.

A method that declares ``MethodSpec.model_stats`` reads one statistics file per input model,
named by that model's ``stats`` parameter (``models[i].parameters.stats``; a global
``parameters.stats`` gives every model the same file, e.g. the base's, an approximation).
Every file is opened up front: its kind must match and it must hold a statistic of the right
shape for every tensor that needs one, so a missing one is an error naming the model and the
tensor before any work. Tensors are then read one group at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from merging.errors import MergeConfigError, StatisticsError
from merging.io.stats import StatsFile
from merging.params import ModelParams
from merging.plan import TensorEntry
from merging.spec import ModelStatistic, ModelStatsNeed

__all__ = ["ModelStats"]


def _expected_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[-1], shape[-1]) if kind == "gram" else tuple(shape)


class ModelStats:
    """The statistics files of every input model for one merge.

    Args:
        method: the method's name (messages).
        need: what the method reads.
        model_names: the input models, in order.
        entries: the plan entries the method merges.
        model_params: the resolved per-model params of an entry (each with a ``stats`` path).

    Raises:
        MergeConfigError: a model has no ``stats`` parameter.
        StatisticsError: a file is missing, of another kind, or lacks a tensor (or has a wrong shape).
    """

    def __init__(self, method: str, need: ModelStatsNeed, model_names: Sequence[str], entries: Sequence[TensorEntry],
                 model_params: Callable[[TensorEntry], Sequence[ModelParams]]) -> None:
        self.need = need
        self.model_names = list(model_names)
        self._files: dict[tuple[int, str], StatsFile] = {}
        self._norms = [0.0] * len(self.model_names)
        for entry in entries:
            if entry.kind not in need.tensor_kinds:
                continue
            resolved = model_params(entry)
            if len(resolved) != len(self.model_names):
                raise MergeConfigError(f"method {method!r}: per-model statistics are not available with slices; merge "
                                       "whole models (models:)")
            for t, params in enumerate(resolved):
                stats = self._file(method, t, params)
                key = stats.key_of(entry.name)
                if key is None:
                    stats.get(entry.name)  # raises, naming the model and the tensor
                self._norms[t] += stats.sq_norm(entry.name) if need.kind == "fisher" else 0.0
        self._norms = [math.sqrt(n) for n in self._norms]

    def _file(self, method: str, t: int, params: ModelParams) -> StatsFile:
        path = getattr(params, "stats", None)
        name = self.model_names[t]
        if not path:
            raise MergeConfigError(
                f"method {method!r} needs per-model {self.need.kind} statistics, but model {name!r} (models[{t}]) has no "
                f"'stats' parameter; " + (self.need.how or f"collect them with 'mergeflow collect-stats {name} TASK_DATA "
                                          f"--kind {self.need.kind} --out FILE' and set models[{t}].parameters.stats: FILE"))
        if (t, path) not in self._files:
            self._files[(t, path)] = StatsFile(path, f"model {name!r}", self.need.kind)
        return self._files[(t, path)]

    def paths(self) -> list[str]:
        """Every statistics file read (for input listings)."""
        return sorted({str(f.path) for f in self._files.values()})

    def for_tensor(self, entry: TensorEntry, model_params: Sequence[ModelParams]) -> tuple[ModelStatistic, ...] | None:
        """Each model's statistic of ``entry`` (None for tensors that need none)."""
        if entry.kind not in self.need.tensor_kinds:
            return None
        found = []
        for t, params in enumerate(model_params):
            stats = self._file("", t, params)
            value = stats.get(entry.name)
            expected = _expected_shape(self.need.kind, entry.shape)
            if tuple(value.shape) != expected:
                raise StatisticsError(
                    f"model {self.model_names[t]!r}: the {self.need.kind} statistic of tensor {entry.name!r} in {stats.path} "
                    f"has shape {tuple(value.shape)}, expected {expected}; the file was collected on another model")
            found.append(ModelStatistic(value, stats.token_count(entry.name), self._norms[t]))
        return tuple(found)
