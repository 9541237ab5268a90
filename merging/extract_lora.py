"""``mergeflow extract-lora``: a full fine-tune's change to its base as a PEFT LoRA adapter.

For each tensor, delta = theta_ft - theta_0 (in ``compute_dtype``); unchanged tensors are not written.
  * 2-D ``weight`` of a module (embeddings and LM heads only with ``embed_lora``): truncated SVD
    delta ~ U_k S_k V_k^T, k <= ``rank``, balanced as lora_B = U_k sqrt(S_k), lora_A = sqrt(S_k) V_k^T
    with alpha = k (scaling 1); zero singular values are dropped, so a delta of rank below k gets its
    own rank (``rank_pattern``). Embeddings are written as peft's ``lora_embedding_A/B``, the LM
    head as ``lora_A/B``. The reconstruction error ||delta - B A||_F / ||delta||_F of the stored
    factors and the energy dropped (sum of dropped s^2 / sum of s^2) are reported per module.
  * Everything else that changed is stored whole: biases with peft's ``bias: "all"`` (on the base
    layer of a module that gets a LoRA), other tensors (norms, embeddings and LM heads without
    ``embed_lora``) with their modules in ``modules_to_save``.
This is mergekit's ``mergekit-extract-lora`` idea (``--max-rank``, ``--embed-lora``); the factoring and
the folder layout are ``merging.io.adapter_writer``'s. Layers are assumed to be ``nn.Linear``
((out, in) weights); GPT-2-style ``Conv1D`` ((in, out)) is not recognised.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merging.config import DEFAULT_EXCLUDE
from merging.context import DTYPES
from merging.errors import MergeConfigError
from merging.io.adapter_writer import AdapterFolder, summary_line, svd_factors
from merging.io.checkpoint import CheckpointReader
from merging.io.files import model_file, read_json_object
from merging.io.sources import resolve_folder
from merging.io.writer import atomic_output_dir, refuse_overlap
from merging.plan import check_same_tensors

__all__ = ["extract_lora", "is_embedding", "is_embedding_or_head", "report_table"]

log = logging.getLogger(__name__)

# modules stored as nn.Embedding (peft's lora_embedding_A/B); the LM heads of DEFAULT_EXCLUDE are nn.Linear
_EMBEDDING = re.compile(r"(.*\.)?(embed_tokens|wte|wpe|shared|embed_positions|word_embeddings|position_embeddings"
                        r"|token_type_embeddings)$")


def is_embedding(module: str) -> bool:
    """Whether ``module`` is an embedding table (nn.Embedding) by its name."""
    return _EMBEDDING.match(module) is not None


def is_embedding_or_head(key: str) -> bool:
    """Whether tensor ``key`` belongs to an embedding or an LM head (``config.DEFAULT_EXCLUDE``)."""
    return any(re.match(pattern, key) for pattern in DEFAULT_EXCLUDE)


def _task_type(folder: Path, owner: str) -> str | None:
    config = model_file(folder, "config.json", owner, required=False)
    if config is None:
        return None
    architectures = read_json_object(config, owner).get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None


def extract_lora(base: str, finetuned: str, out: str | Path, *, rank: int, embed_lora: bool = False,
                 overwrite: bool = False, compute_dtype: str = "float32",
                 progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Write the change from ``base`` to ``finetuned`` as a PEFT LoRA adapter folder at ``out``.

    Args:
        base: the base model (folder or hub id).
        finetuned: the full fine-tune of it (same tensor names and shapes).
        out: the adapter folder to write (atomically).
        rank: the largest rank of a module.
        embed_lora: also factor embeddings and LM heads (otherwise they are stored whole).
        overwrite: replace an existing ``out``.
        compute_dtype: float32 or float64, for the deltas and their SVDs.
        progress: called with (done, total, tensor name).

    Returns:
        The report also written as ``adapter_report.json``: per module rank, energy dropped,
        relative error (or the tensors stored whole), and a summary.

    Raises:
        MergeConfigError: ``rank`` < 1 or an unknown compute dtype.
        CheckpointMismatchError: the two models' tensors differ in names or shapes.
    """
    if rank < 1:
        raise MergeConfigError(f"--rank {rank}: give a rank of at least 1")
    if compute_dtype not in ("float32", "float64"):
        raise MergeConfigError(f"compute dtype {compute_dtype!r}: use float32 or float64")
    dtype = DTYPES[compute_dtype]
    base_folder, tuned_folder = resolve_folder(base), resolve_folder(finetuned)
    base_reader = CheckpointReader(base_folder, name=base)
    tuned = CheckpointReader(tuned_folder, name=finetuned)
    check_same_tensors(base_reader.shapes(), tuned.shapes(), finetuned)
    refuse_overlap(out, {f"base {base!r}": base_folder, f"model {finetuned!r}": tuned_folder})
    adapter = AdapterFolder(torch.float32)
    keys = base_reader.keys()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for done, key in enumerate(keys, start=1):
            _extract(adapter, key, base_reader.get(key), tuned.get(key), rank, embed_lora, dtype)
            if progress is not None:
                progress(done, len(keys), key)
        report = adapter.write(tmp, base_model=base, task_type=_task_type(base_folder, f"base model {base!r}"))
    log.info("extract-lora %s -> %s: %s", finetuned, out, summary_line(report))
    return report


def _extract(adapter: AdapterFolder, key: str, base: torch.Tensor, tuned: torch.Tensor, rank: int, embed_lora: bool,
             dtype: torch.dtype) -> None:
    if not (base.is_floating_point() and tuned.is_floating_point()):
        if not torch.equal(base, tuned):
            log.warning("extract-lora: non-float tensor %r differs from the base; it is not stored", key)
        return
    delta = tuned.to(dtype) - base.to(dtype)
    if not delta.any():
        return
    module, _, param = key.rpartition(".")
    if delta.dim() == 2 and param == "weight" and (embed_lora or not is_embedding_or_head(key)):
        adapter.add_lora(module, svd_factors(delta, rank), delta, embedding=is_embedding(module))
    else:
        adapter.add_full(key, tuned)


def report_table(report: dict[str, Any]) -> str:
    """The per-module report as a text table (what the CLI prints)."""
    lines = [f"{'module':<48} {'rank':>5} {'rel. error':>11} {'energy dropped':>15}"]
    for module, row in report["modules"].items():
        if row.get("rank") is not None:
            lines.append(f"{module:<48} {row['rank']:>5} {row['relative_error']:>11.3e} {row['energy_dropped']:>15.3e}")
        if row.get("whole_tensors"):
            lines.append(f"{module:<48} {'whole':>5} {', '.join(row['whole_tensors'])}")
    lines.append(summary_line(report))
    return "\n".join(lines)

