"""Merged deltas written as a PEFT LoRA adapter folder: exact factors in the inputs' span, or truncated.

The folder is what peft 0.17+ loads with ``PeftModel.from_pretrained(base, folder)``
(``../shared/specs/circuit-della-peft.md`` §3.1):

* ``adapter_model.safetensors``: per LoRA module ``base_model.model.<module>.lora_A.weight`` (k, in)
  and ``lora_B.weight`` (out, k); embeddings ``lora_embedding_A`` (k, vocab) and
  ``lora_embedding_B`` (hidden, k) (delta = (B A)^T, as for ``fan_in_fan_out`` modules); whole
  tensors under ``base_model.model.<key>``: changed biases (``bias: "all"``; ``.base_layer.bias``
  for a module that carries a LoRA) and the other changed tensors, whose modules go to
  ``modules_to_save`` (peft cannot hold both a LoRA and a saved copy of one module).
* ``adapter_config.json``: ``r`` = ``lora_alpha`` = the most common module rank, the other
  modules in ``rank_pattern`` / ``alpha_pattern`` with alpha = rank (every scaling is 1, never
  rsLoRA), keyed by the escaped full module name: peft's ``get_pattern_key`` matches a key as the
  regex ``(.*\\.)?(key)$`` against the module name, so the escaped name matches that module
  only. ``target_modules`` lists the full module names.
* ``adapter_report.json``: per module its rank, the energy dropped and the relative error.

Factoring one module's delta dW (n, m), in float64 (lora-core.md §3 "natively a LoRA"):
  In the span. The inputs' factors B_t (n, r_t), A_t (r_t, m), R = sum_t r_t; Q_B = qr([B_1 | ...])
  (n, p), Q_A = qr([A_1; ...]^T) (m, q), p, q <= R. Left: P = Q_B^T dW (p, m) and the residual
  ||dW||^2 - ||P||^2; if it is <= SPAN_RTOL ||dW|| then svd(P) = U S V^T and dW = (Q_B U) S V^T.
  Else right: dW Q_A (n, q), the mirror image. Task arithmetic, linear, TSV-M and every Core
  Space merge keep both spans; DRM-H only the column space (dW = U_r M), DRM-V only the row space.
  A delta that leaves both is refused, or (with a rank) takes the dense route.
  Given as factors (``add_factored``: a method's ``combine_factors`` on the LoRA factor route,
  dW = b a with b (n, k), a (k, m), k <= T r): qr(b) = Q_b R_b, qr(a^T) = Q_a R_a,
  svd(R_b R_a^T) = U S V^T, dW = (Q_b U) S (Q_a V)^T; no (n, m) matrix is ever formed.
  Dense (a full-rank result, ``rank`` given): svd(dW) = U S V^T (Eckart-Young).
  Zero singular values are dropped: the smallest ones whose tail norm is at most 4 eps(dW's dtype)
  ||dW||_F (rounding noise of the merged delta, never a real direction of the result). A rank k
  keeps the k largest; energy dropped = sum of dropped s_j^2 / sum_j s_j^2. Balanced split:
  B' = U sqrt(S), A' = sqrt(S) V^T. The relative error ||dW - B'A'||_F / ||dW||_F is measured on
  the stored (cast) factors from Gram matrices, without forming an (n, m) product.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merging.errors import AdapterError, MergeConfigError, NonFiniteOutputError
from merging.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter

__all__ = ["Factored", "AdapterContents", "AdapterFolder", "MergedAdapter", "span_factors", "svd_factors",
           "product_factors", "factored_error",
           "adapter_contents", "span_of", "relative_error", "read_report", "summary_line", "REPORT", "SPAN_RTOL"]

log = logging.getLogger(__name__)

REPORT = "adapter_report.json"
SPAN_RTOL = 5e-6  # a merged delta whose part outside the inputs' span is below this (relative) is in it
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
_SAVED_COPY = re.compile(r"\.modules_to_save(\.[^.]+)?(?=\.[^.]+$)")


class Factored(NamedTuple):
    """``dW ~ b @ a`` in the base tensor's layout: b (n, k), a (k, m), float64."""

    b: torch.Tensor
    a: torch.Tensor
    energy_dropped: float  # sum of the dropped s_j^2 over sum_j s_j^2
    singular_values: torch.Tensor  # all of them, descending (kept and dropped)


def _kept(s: torch.Tensor, norm: float, dtype: torch.dtype, rank: int | None) -> int:
    """How many leading singular values to keep: not the zero tail, at most ``rank``."""
    tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s.double() ** 2, (0,)), 0), (0,)))  # tail[j] = ||s[j:]||
    floor = 4 * torch.finfo(dtype).eps * norm
    nonzero = int((tail > floor).sum())
    return nonzero if rank is None else min(rank, nonzero)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    root = s[:keep].sqrt()
    total = float((s**2).sum())
    dropped = float((s[keep:] ** 2).sum()) / total if total > 0 else 0.0
    return u[:, :keep] * root, root.unsqueeze(1) * vh[:keep], dropped


def span_factors(delta: torch.Tensor, lora_b: Sequence[torch.Tensor], lora_a: Sequence[torch.Tensor],
                 rank: int | None = None) -> Factored | None:
    """Exact (or, with ``rank``, truncated) LoRA factors of ``delta`` through the inputs' span.

    Args:
        delta: the merged delta (n, m), any float dtype (its eps sets the zero tail).
        lora_b: the inputs' B_t (n, r_t) that touch this matrix.
        lora_a: their A_t (r_t, m).
        rank: keep at most this many singular triplets.

    Returns:
        The factors, or None when ``delta`` lies neither in the column span of the B_t nor in the
        row span of the A_t (relative residual above ``SPAN_RTOL``).
    """
    work = delta.detach().to("cpu", torch.float64)
    norm = float(torch.linalg.matrix_norm(work))
    if norm == 0:
        return Factored(work.new_zeros(work.shape[0], 0), work.new_zeros(0, work.shape[1]), 0.0, work.new_zeros(0))
    q_b = torch.linalg.qr(torch.cat([b.to("cpu", torch.float64) for b in lora_b], dim=1)).Q  # (n, p)
    q_a = torch.linalg.qr(torch.cat([a.to("cpu", torch.float64) for a in lora_a], dim=0).T).Q  # (m, q)
    left, right = q_b.T @ work, work @ q_a  # (p, m), (n, q)
    residuals = [max(norm**2 - float(side.square().sum()), 0.0) ** 0.5 / norm for side in (left, right)]
    if min(residuals) > SPAN_RTOL:
        return None
    if residuals[0] <= residuals[1]:
        u, s, vh = torch.linalg.svd(left, full_matrices=False)  # left = U S V^T, dW = (Q_B U) S V^T
        u = q_b @ u
    else:
        u, s, vh = torch.linalg.svd(right, full_matrices=False)  # dW Q_A = U S V^T, dW = U S (Q_A V)^T
        vh = vh @ q_a.T
    b, a, dropped = _split(u, s, vh, _kept(s, norm, delta.dtype, rank))
    return Factored(b, a, dropped, s)


def svd_factors(delta: torch.Tensor, rank: int) -> Factored:
    """The best rank-``rank`` LoRA factors of ``delta`` (n, m) from its dense SVD (Eckart-Young),
    in ``delta``'s dtype (float32 or float64) and returned in float64."""
    work = delta.detach().to("cpu", torch.float64 if delta.dtype == torch.float64 else torch.float32)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    u, s, vh = u.double(), s.double(), vh.double()
    b, a, dropped = _split(u, s, vh, _kept(s, float(torch.linalg.matrix_norm(work.double())), delta.dtype, rank))
    return Factored(b, a, dropped, s)


def product_factors(b: torch.Tensor, a: torch.Tensor, rank: int | None = None) -> Factored:
    """Balanced (or, with ``rank``, truncated) LoRA factors of the product ``b @ a`` (n, k) x
    (k, m), from the factors alone: qr(b) = Q_b R_b, qr(a^T) = Q_a R_a, svd(R_b R_a^T) = U S V^T,
    so b a = (Q_b U) S (Q_a V)^T; no (n, m) matrix is formed. Zero singular values are dropped
    as in ``span_factors`` (the tail at most 4 eps(b's dtype) ||b a||_F)."""
    work_b, work_a = b.detach().to("cpu", torch.float64), a.detach().to("cpu", torch.float64)
    if work_b.shape[1] == 0:
        return Factored(work_b, work_a, 0.0, work_b.new_zeros(0))
    q_b, r_b = torch.linalg.qr(work_b)
    q_a, r_a = torch.linalg.qr(work_a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    norm = float(s.square().sum().sqrt())
    if norm == 0:
        return Factored(work_b.new_zeros(work_b.shape[0], 0), work_a.new_zeros(0, work_a.shape[1]), 0.0, s)
    factors_b, factors_a, dropped = _split(q_b @ u, s, vh @ q_a.T, _kept(s, norm, b.dtype, rank))
    return Factored(factors_b, factors_a, dropped, s)


def factored_error(b: torch.Tensor, a: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """||b a - b2 a2||_F / ||b a||_F from Gram matrices (no (n, m) product), in float64."""
    b, a, b2, a2 = (x.detach().to("cpu", torch.float64) for x in (b, a, b2, a2))
    norm2 = float(((b.T @ b) * (a @ a.T)).sum())
    if norm2 <= 0:
        return 0.0
    cross = float(((b.T @ b2) * (a @ a2.T)).sum())
    own = float(((b2.T @ b2) * (a2 @ a2.T)).sum())
    return max(norm2 - 2 * cross + own, 0.0) ** 0.5 / norm2**0.5


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """||delta - b a||_F / ||delta||_F from Gram matrices (no (n, m) product), in float64."""
    d, b, a = delta.detach().to("cpu", torch.float64), b.to("cpu", torch.float64), a.to("cpu", torch.float64)
    norm2 = float(d.square().sum())
    if norm2 == 0:
        return 0.0
    cross = float(((d.T @ b) * a.T).sum())  # <d, b a>
    own = float(((b.T @ b) * (a @ a.T)).sum())  # ||b a||^2
    return max(norm2 - 2 * cross + own, 0.0) ** 0.5 / norm2**0.5


class AdapterContents(NamedTuple):
    """What a PEFT adapter file stores: LoRA modules (module name -> (A key, B key, embedding))
    and the base keys saved as whole tensors (``modules_to_save``, biases, the copy of an
    embedding peft saves beside its LoRA)."""

    lora: dict[str, tuple[str, str, bool]]
    full: set[str]


def adapter_contents(adapter: LoraAdapter) -> AdapterContents:
    """The contents of ``adapter``'s weights file, from its keys alone."""
    parts: dict[str, dict[str, str]] = {}
    full: set[str] = set()
    with safe_open(adapter.path / ADAPTER_WEIGHTS, framework="pt") as handle:
        keys = list(handle.keys())
    for key in keys:
        rel = key.removeprefix(_PREFIX)
        found = _LORA_KEY.match(rel)
        if found is not None:
            parts.setdefault(found["module"], {})[found["part"]] = key
        else:
            full.add(_SAVED_COPY.sub("", rel).replace(".base_layer.", "."))
    lora = {}
    for module, found in parts.items():
        embedding = "lora_embedding_A" in found
        a_key, b_key = (found.get("lora_embedding_A"), found.get("lora_embedding_B")) if embedding else (
            found.get("lora_A.weight"), found.get("lora_B.weight"))
        if a_key is None or b_key is None:
            raise AdapterError(f"adapter {adapter.name!r}: module {module!r} lacks one of its two LoRA factors")
        lora[module] = (a_key, b_key, embedding)
    return AdapterContents(lora, full)


def span_of(adapter: LoraAdapter, contents: AdapterContents, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The raw LoRA factors ``(B, A)`` of ``module`` in the base tensor's layout (``(n, r)``,
    ``(r, m)``; no scaling: only their spans matter), or None when the adapter has none."""
    if module not in contents.lora:
        return None
    a_key, b_key, embedding = contents.lora[module]
    with safe_open(adapter.path / ADAPTER_WEIGHTS, framework="pt") as handle:
        a, b = handle.get_tensor(a_key).double(), handle.get_tensor(b_key).double()  # (r, in), (out, r)
    if embedding or adapter.config.get("fan_in_fan_out"):  # base layout is (B A)^T = A^T B^T
        return a.T, b.T
    return b, a


def _module_of(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


class AdapterFolder:
    """The tensors and config of one PEFT LoRA adapter, collected module by module, then written.

    Args:
        dtype: the dtype of the stored factors.
        fan_in_fan_out: the config flag (the base stores (in, out) matrices, GPT-2's Conv1D).
    """

    def __init__(self, dtype: torch.dtype = torch.float32, fan_in_fan_out: bool = False) -> None:
        self.dtype = dtype
        self.fan_in_fan_out = fan_in_fan_out
        self.tensors: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}
        self.report: dict[str, dict[str, Any]] = {}
        self._full: dict[str, torch.Tensor] = {}

    def add_lora(self, module: str, factored: Factored, delta: torch.Tensor | tuple[torch.Tensor, torch.Tensor], *,
                 transpose: bool = False, embedding: bool = False) -> None:
        """Store ``delta ~ factored.b @ factored.a`` (base layout) as the LoRA of ``module``
        (``delta`` dense, or as factors ``(b, a)``); ``transpose``: peft's layout is the
        transpose (embeddings, ``fan_in_fan_out``)."""
        b, a = factored.b.to(self.dtype), factored.a.to(self.dtype)
        error = factored_error(*delta, b, a) if isinstance(delta, tuple) else relative_error(delta, b, a)
        self.report[module] = {"rank": b.shape[1], "energy_dropped": factored.energy_dropped, "relative_error": error}
        if b.shape[1] == 0:
            return
        lora_b, lora_a = (a.T, b.T) if transpose or embedding else (b, a)  # peft: delta = B A, or (B A)^T
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        self.tensors[f"{_PREFIX}{module}.{names[0]}"] = lora_a.contiguous()
        self.tensors[f"{_PREFIX}{module}.{names[1]}"] = lora_b.contiguous()
        self.ranks[module] = b.shape[1]

    def add_full(self, key: str, tensor: torch.Tensor) -> None:
        """Store a whole tensor (a bias, or a tensor of a module for ``modules_to_save``)."""
        self._full[key] = tensor.detach().to("cpu").contiguous()

    def write(self, folder: Path, *, base_model: str | None = None, task_type: str | None = None) -> dict[str, Any]:
        """Write ``adapter_model.safetensors``, ``adapter_config.json`` and ``adapter_report.json``
        into ``folder``; returns the report."""
        if not self.ranks:
            raise MergeConfigError("no LoRA module to write: no matrix changed, or every changed tensor is stored whole, "
                                   "and peft cannot load an adapter without one; use out_format: hf")
        saved = sorted({_module_of(k)[0] for k, _ in self._full.items() if _module_of(k)[1] != "bias"})
        clash = sorted(set(saved) & set(self.ranks))
        if clash:
            raise MergeConfigError(f"module {clash[0]!r} carries a LoRA and a changed whole tensor; a PEFT adapter "
                                   "cannot hold both (peft saves a module either as a LoRA or in modules_to_save); "
                                   "use out_format: hf")
        biases = False
        for key, tensor in self._full.items():
            module, param = _module_of(key)
            if param == "bias" and module not in saved:
                biases = True
                if module in self.ranks:  # the bias of a LoRA layer lives on its base layer
                    key = f"{module}.base_layer.bias"
            self.tensors[_PREFIX + key] = tensor
            self.report.setdefault(module, {"rank": None}).setdefault("whole_tensors", []).append(param)
        counts = Counter(self.ranks.values())
        r = max(counts, key=lambda k: (counts[k], k)) if counts else 1
        pattern = {re.escape(m): k for m, k in sorted(self.ranks.items()) if k != r}
        config = {
            "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
            "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False,
            "target_modules": sorted(self.ranks), "modules_to_save": saved or None,
            "fan_in_fan_out": self.fan_in_fan_out, "bias": "all" if biases else "none", "lora_dropout": 0.0,
            "use_dora": False, "lora_bias": False, "init_lora_weights": True, "inference_mode": True,
        }
        save_file(self.tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        lora = [v for v in self.report.values() if v.get("rank")]
        summary = {"modules": len(lora), "max_rank": max((v["rank"] for v in lora), default=0),
                   "max_energy_dropped": max((v["energy_dropped"] for v in lora), default=0.0),
                   "mean_energy_dropped": sum(v["energy_dropped"] for v in lora) / len(lora) if lora else 0.0,
                   "max_relative_error": max((v["relative_error"] for v in lora), default=0.0),
                   "whole_tensors": len(self._full)}
        report = {"summary": summary, "modules": dict(sorted(self.report.items()))}
        (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        return report


def read_report(folder: str | Path) -> dict[str, Any]:
    """The ``adapter_report.json`` of an adapter folder mergeflow wrote."""
    return json.loads((Path(folder) / REPORT).read_text())


def summary_line(report: dict[str, Any]) -> str:
    """One line on an adapter's factoring: modules, ranks, energy dropped, error."""
    s = report["summary"]
    return (f"{s['modules']} LoRA module(s), rank <= {s['max_rank']}; energy dropped per module: max "
            f"{s['max_energy_dropped']:.3g}, mean {s['mean_energy_dropped']:.3g}; max relative error "
            f"{s['max_relative_error']:.3g}; {s['whole_tensors']} whole tensor(s)")


class MergedAdapter:
    """A merge of LoRA adapters collected as a PEFT adapter, one merged tensor at a time.

    Args:
        adapters: the merge's inputs, every one a LoRA adapter.
        in_span: the method keeps the inputs' span (``MethodSpec.keeps_lora_span``): a LoRA
            module is factored exactly through it, and a delta that leaves it is refused
            unless ``rank`` is given.
        rank: the per-module rank cap (``adapter_rank``); required when not ``in_span``.
        dtype: the dtype of the stored factors.

    Raises:
        MergeConfigError: the method does not keep the span and no ``rank`` is given, or the
            adapters disagree on ``fan_in_fan_out``.
    """

    def __init__(self, adapters: Sequence[LoraAdapter], *, in_span: bool, rank: int | None,
                 dtype: torch.dtype = torch.float32, method: str = "") -> None:
        if not in_span and rank is None:
            raise MergeConfigError(
                f"out_format: peft: {method or 'this method'} gives full-rank merged deltas that leave the adapters' "
                "span; give --adapter-rank K (adapter_rank) to store a truncated SVD, or use task_arithmetic, linear, "
                "drm, tsv_m or merge_space: core")
        flags = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
        if len(flags) > 1:
            raise AdapterError("the adapters disagree on fan_in_fan_out; they cannot be written as one adapter")
        self.adapters = [(a, adapter_contents(a)) for a in adapters]
        self.in_span, self.rank, self.method = in_span, rank, method
        self.folder = AdapterFolder(dtype, fan_in_fan_out=flags.pop() if flags else False)
        task_types = {a.config.get("task_type") for a in adapters}
        self.task_type = task_types.pop() if len(task_types) == 1 else None

    def add(self, key: str, delta: torch.Tensor, whole: Callable[[], torch.Tensor]) -> None:
        """Take the merged delta (scaled by lambda) of base tensor ``key``; ``whole()`` gives the
        merged tensor itself (base + delta, in the output dtype) when it must be stored whole."""
        if not delta.any():
            return  # unchanged: not written
        if not torch.isfinite(delta).all():
            raise NonFiniteOutputError(f"merged tensor {key!r} holds NaN or Inf; an adapter cannot store it "
                                       f"(method {self.method}); lower lambda or the weights")
        module, param = _module_of(key)
        found = [span_of(a, c, module) for a, c in self.adapters] if param == "weight" else []
        found = [f for f in found if f is not None]
        saved_whole = any(key in c.full for _, c in self.adapters)
        if not found:
            self.folder.add_full(key, whole())
            return
        factored = span_factors(delta, [b for b, _ in found], [a for _, a in found], self.rank)
        if factored is None and saved_whole:  # an input saved it whole (modules_to_save): so is the merge
            self.folder.add_full(key, whole())
            return
        if factored is None:
            if self.rank is None:
                raise MergeConfigError(
                    f"out_format: peft: the merged delta of {key!r} is not in the span of the adapters' factors "
                    f"({self.method} left it for this tensor: e.g. a matrix some adapter does not touch takes the "
                    "dense route, an embedding the element-wise path); give --adapter-rank K (adapter_rank) to "
                    "store a truncated SVD, or use out_format: hf")
            factored = svd_factors(delta, self.rank)
        embedding = any(c.lora.get(module, ("", "", False))[2] for _, c in self.adapters)
        self.folder.add_lora(module, factored, delta, transpose=self.folder.fan_in_fan_out, embedding=embedding)

    def add_factored(self, key: str, b: torch.Tensor, a: torch.Tensor) -> None:
        """Take the merged delta of LoRA matrix ``key`` as factors, ``delta = b @ a`` (scaled by
        lambda; a method's ``combine_factors``): balanced through a small SVD, never densified."""
        if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
            raise NonFiniteOutputError(f"merged tensor {key!r} holds NaN or Inf; an adapter cannot store it "
                                       f"(method {self.method}); lower lambda or the weights")
        factored = product_factors(b, a, self.rank)
        if factored.b.shape[1] == 0:
            return  # unchanged: not written
        module, _ = _module_of(key)
        embedding = any(c.lora.get(module, ("", "", False))[2] for _, c in self.adapters)
        self.folder.add_lora(module, factored, (b, a), transpose=self.folder.fan_in_fan_out, embedding=embedding)

    def write(self, folder: Path, base_model: str | None) -> dict[str, Any]:
        """Write the adapter folder (see ``AdapterFolder.write``) and log its summary."""
        report = self.folder.write(folder, base_model=base_model, task_type=self.task_type)
        log.info("adapter: %s", summary_line(report))
        return report
