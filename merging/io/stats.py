"""Statistics files of the data-aware methods (``mergeflow collect-stats``), read and written here.

One safetensors file per (model, data). Its metadata, one JSON object under the single key
``mergeflow_stats`` (safetensors writes several metadata keys in no fixed order, and the same
statistics must give the same bytes), says what it holds:

* ``kind``: ``act`` (Scale-SVD: mean of x_j^2 per input feature of each Linear, shape (in,)),
  ``gram`` (RegMean: mean of x x^T over the non-pad tokens at each Linear's input, (in, in),
  fp32) or ``fisher`` (diagonal Fisher of every float parameter, the parameter's shape, fp32);
* ``model``: the model that produced it (a folder or ``base+adapter``), ``data`` and
  ``data_sha256``: the task data it ran on, ``max_samples`` / ``max_length``;
* ``tokens``: ``{key: N}``, the tokens each statistic is a mean over;
* ``aliases``: ``{weight name: stored key}``: Linears fed by one input (q/k/v, gate/up)
  share one Gram, stored once under the first one's name (safetensors cannot store shared memory);
* ``sq_norms``: ``{key: sum of squares}`` (fisher), so a whole-model norm over the merged
  tensors needs no pass over the file.

Tensors are keyed by the weight name they belong to (``model.layers.0.mlp.down_proj.weight``).
A file without that key is an older activation file (``act``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merging.errors import StatisticsError
from merging.io.writer import atomic_write

__all__ = ["STATS_KINDS", "METADATA_KEY", "StatsFile", "write_stats", "collected_stats", "STATS_FILE"]

STATS_KINDS = ("act", "gram", "fisher")
METADATA_KEY = "mergeflow_stats"


def write_stats(path: str | Path, tensors: Mapping[str, torch.Tensor], kind: str, *, tokens: Mapping[str, int],
                aliases: Mapping[str, str] | None = None, info: Mapping[str, object] | None = None) -> Path:
    """Write a statistics file atomically (fp32, contiguous); returns its path.

    Args:
        path: the safetensors file to write.
        tensors: stored key -> statistic.
        kind: one of ``STATS_KINDS``.
        tokens: stored key -> the number of tokens its mean is over.
        aliases: weight name -> stored key, for Linears sharing an input.
        info: more metadata (``model``, ``data``, ``data_sha256``, ...).
    """
    if kind not in STATS_KINDS:
        raise ValueError(f"unknown statistics kind {kind!r}; one of {STATS_KINDS}")
    stored = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    metadata: dict[str, object] = {"kind": kind, "tokens": dict(tokens), "aliases": dict(aliases or {})}
    if kind == "fisher":  # float64 sums of the fp32 tensors, for whole-model norms
        metadata["sq_norms"] = {k: float(v.double().square().sum()) for k, v in stored.items()}
    metadata |= dict(info or {})
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(stored, str(tmp), metadata=header))


class StatsFile:
    """One statistics file, opened lazily: tensors are read when asked for.

    Args:
        path: the file.
        owner: how the model it belongs to is named in messages (``model 'ft_a'``).
        kind: the kind the reader needs; a file of another kind is refused.

    Raises:
        StatisticsError: the file is missing, not safetensors, or of another kind.
    """

    def __init__(self, path: str | Path, owner: str, kind: str) -> None:
        self.path = Path(path)
        self.owner = owner
        if not self.path.is_file():
            raise StatisticsError(f"{owner}: statistics file {self.path} does not exist; create it with "
                                  f"'mergeflow collect-stats MODEL DATA --kind {kind} --out {self.path}'")
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                self.metadata: dict = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
                self._keys = set(handle.keys())
        except Exception as err:  # safetensors raises its own types for a malformed header
            raise StatisticsError(f"{owner}: statistics file {self.path} is not a safetensors file ({err})") from None
        self.kind = str(self.metadata.get("kind", "act"))
        if self.kind != kind:
            raise StatisticsError(f"{owner}: statistics file {self.path} holds {self.kind!r} statistics, the method needs "
                                  f"{kind!r}; collect them with 'mergeflow collect-stats MODEL DATA --kind {kind}'")
        self.aliases: dict[str, str] = dict(self.metadata.get("aliases", {}))
        self.tokens: dict[str, int] = dict(self.metadata.get("tokens", {}))
        self._sq_norms: dict[str, float] = dict(self.metadata.get("sq_norms", {}))

    def key_of(self, name: str) -> str | None:
        """The stored key holding the statistic of weight ``name`` (through an alias), or None."""
        key = self.aliases.get(name, name)
        return key if key in self._keys else None

    def __contains__(self, name: str) -> bool:
        return self.key_of(name) is not None

    def get(self, name: str) -> torch.Tensor:
        """The statistic of weight ``name`` (fp32).

        Raises:
            StatisticsError: the file has none for ``name``.
        """
        key = self.key_of(name)
        if key is None:
            raise StatisticsError(
                f"{self.owner}: statistics file {self.path} has no {self.kind} statistic for tensor {name!r} "
                f"(produced by {self.metadata.get('model', 'an unknown model')}); recollect it with 'mergeflow "
                f"collect-stats --kind {self.kind}' on this model, or exclude the tensor")
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(key).to(torch.float32)

    def token_count(self, name: str) -> int:
        """N: the tokens the statistic of ``name`` is a mean over (0 when unrecorded)."""
        return int(self.tokens.get(self.key_of(name) or name, 0))

    def sq_norm(self, name: str) -> float:
        """The sum of squares of the statistic of ``name`` (from the metadata when recorded)."""
        key = self.key_of(name)
        if key is not None and key in self._sq_norms:
            return self._sq_norms[key]
        return float(self.get(name).double().square().sum())


STATS_FILE = "stats.json"
"""The collect_stats artifact's identity: each input's statistics file and its sha256."""


def collected_stats(folder: str | Path | None) -> dict[str, str]:
    """Model name -> statistics file, from a collect_stats artifact (empty for none)."""
    if folder is None:
        return {}
    listed = json.loads((Path(folder) / STATS_FILE).read_text())
    return {name: str(Path(folder) / f"{name}.safetensors") for name in listed}
