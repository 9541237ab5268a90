"""Statistics of a model on its data for the data-aware methods (``mergeflow collect-stats``).

Kinds (``../shared/specs/data-aware.md``; the file format is ``merging.io.stats``):

* ``act`` (Scale-SVD): per nn.Linear, the mean over tokens of x_j^2 of its input features (d_in,);
* ``gram`` (RegMean): per nn.Linear input, G = (1/N) sum_t x_t x_t^T over the non-pad tokens,
  accumulated in fp32, stored with N; Linears fed by one tensor (q/k/v, gate/up) share one Gram,
  stored once and aliased;
* ``fisher`` (Fisher merging): per float parameter, the diagonal Fisher (1/N) sum_seq g^2 with
  g the gradient of sum_t log p(y^_t | x_<=t) over one sequence's scored (non-pad) positions,
  labels y^_t sampled from the model (seeded), N the scored tokens; fp32.

The model is a full model folder or ``base+adapter`` (mergekit's form: the LoRA adapter is
folded into the base's weights, which gives the same activations and the gradient of the dense
weight); RegMean and Fisher want the *fine-tuned* model on *its own task* data. The producing
model and a digest of the data go into the file's metadata. Safetensors weights only unless
``allow_pickle``; never remote code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from merging.errors import MergeConfigError
from merging.io.adapter import LoraAdapter
from merging.io.checkpoint import CheckpointReader
from merging.io.sources import is_adapter_folder, resolve_folder
from merging.io.stats import STATS_KINDS, write_stats

__all__ = ["collect_stats", "collect_activation_stats", "load_causal_lm",
           "read_texts", "data_digest"]


def read_texts(path: Path, max_samples: int) -> list[str]:
    """Lines of a .txt file, or the ``text`` field (else question/prompt) of a .jsonl file."""
    if not path.is_file():
        raise MergeConfigError(f"calibration data {path} does not exist")
    texts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = json.loads(line)
            text = row.get("text") or row.get("question") or row.get("prompt")
            if text is None:
                raise MergeConfigError(f"{path}: JSONL rows need a 'text' (or 'question'/'prompt') field")
            texts.append(str(text))
        else:
            texts.append(line)
        if len(texts) >= max_samples:
            break
    if not texts:
        raise MergeConfigError(f"calibration data {path} holds no text")
    return texts


def data_digest(path: Path) -> str:
    """sha256 of the data file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_causal_lm(model: str, *, device: str = "cpu", allow_pickle: bool = False):
    """(model in fp32, eval mode, tokenizer) of a model folder or ``base+adapter`` (the adapter's
    LoRA deltas added to the base's weights, as peft's ``merge_and_unload`` gives)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_ref, adapter_ref = model, None
    if "+" in model and not Path(model).exists():
        base_ref, adapter_ref = model.split("+", 1)
    folder = resolve_folder(base_ref)
    if adapter_ref is None and is_adapter_folder(folder):
        raise MergeConfigError(f"model {model!r} is a LoRA adapter; give it with its base as BASE+ADAPTER")
    CheckpointReader(folder, name=base_ref, allow_pickle=allow_pickle).close()
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=not allow_pickle,
                                              trust_remote_code=False)
    tokenizer_folder = folder
    if adapter_ref is not None:
        adapter_folder = resolve_folder(adapter_ref)
        adapter = LoraAdapter(adapter_folder, name=adapter_ref)
        state = lm.state_dict()
        adapter.check_against({k: tuple(v.shape) for k, v in state.items()})
        with torch.no_grad():
            for key, param in lm.named_parameters():
                delta = adapter.delta(key, param)
                if delta is not None:
                    param.add_(delta.to(param.dtype))
        if (adapter_folder / "tokenizer_config.json").is_file():
            tokenizer_folder = adapter_folder
    if not any((tokenizer_folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise MergeConfigError(f"model {model!r}: no tokenizer files in {tokenizer_folder}; copy its base's tokenizer there")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    if tokenizer.pad_token is None:  # padded positions are masked out of every statistic
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return lm.to(device).eval(), tokenizer


def _batches(tokenizer, texts: list[str], batch_size: int, max_length: int, device: str):
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length)
        yield {k: v.to(device) for k, v in batch.items()}


def _linear_inputs(lm, texts, tokenizer, batch_size, max_length, device,
                   accumulate: Callable[[str, torch.Tensor], None]) -> dict[str, str]:
    """Run ``lm`` over the texts, calling ``accumulate(weight name, x (n, in))`` with the non-pad
    inputs of every nn.Linear; a Linear fed the same tensor as an earlier one in the forward
    (q/k/v, gate/up) is not called but returned as an alias ``{weight name: first weight name}``."""
    mask: list[torch.Tensor] = []
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # first batch only: input tensor id -> (tensor, owner)
    aliases: dict[str, str] = {}
    first = [True]
    hooks = []

    def hook(module, inputs, key):
        x = inputs[0]
        if key in aliases:
            return
        if first[0]:
            if id(x) in seen:
                aliases[key] = seen[id(x)][1]
                return
            seen[id(x)] = (x, key)  # the reference keeps the id from being reused within the forward
        accumulate(key, x.detach()[mask[0]].to(torch.float32))  # (n, in): non-pad tokens

    for name, module in lm.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(lambda m, i, key=f"{name}.weight": hook(m, i, key)))
    try:
        with torch.no_grad():
            for batch in _batches(tokenizer, texts, batch_size, max_length, device):
                mask[:] = [batch["attention_mask"].bool()]
                lm(**batch)
                first[0] = False
                seen.clear()
    finally:
        for h in hooks:
            h.remove()
    return aliases


def _fisher(lm, texts, tokenizer, max_length, device, seed) -> tuple[dict[str, torch.Tensor], int, dict[str, str]]:
    """Diagonal Fisher of every float parameter with sampled labels, one sequence per backward."""
    params = {n: p for n, p in lm.named_parameters() if p.is_floating_point()}
    aliases = {n: next(k for k, q in params.items() if q is p)
               for n, p in lm.named_parameters(remove_duplicate=False) if n not in params}  # tied weights
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = 0
    for p in params.values():
        p.requires_grad_(True)
    for batch in _batches(tokenizer, texts, 1, max_length, device):
        lm.zero_grad(set_to_none=True)
        keep = batch["attention_mask"][0].bool()
        logits = lm(**batch).logits[0][keep].to(torch.float32)  # (n, vocab): scored positions
        log_probs = torch.log_softmax(logits, dim=-1)
        sampled = torch.multinomial(log_probs.detach().exp(), 1, generator=generator)  # (n, 1): y^_t ~ p(.|x_<=t)
        log_probs.gather(1, sampled).sum().backward()
        tokens += int(keep.sum())
        for n, p in params.items():
            if p.grad is not None:
                sums[n] += p.grad.detach().to(torch.float32).square()
    lm.zero_grad(set_to_none=True)
    return {n: s / max(tokens, 1) for n, s in sums.items()}, tokens, aliases


def collect_stats(model: str | Path, data: str | Path, out: str | Path, *, kind: str = "act", max_samples: int = 256,
                  max_length: int = 256, batch_size: int = 8, device: str = "cpu", seed: int = 0,
                  allow_pickle: bool = False) -> Path:
    """Write the ``kind`` statistics of ``model`` on ``data`` to ``out`` (safetensors); see the module docstring.

    Args:
        model: a model folder, hub id or ``base+adapter``.
        data: the model's task data: .txt (one sample a line) or .jsonl (``text``/``question``/``prompt``).
        out: the statistics file.
        kind: ``act``, ``gram`` or ``fisher``.
        max_samples / max_length: samples read, tokens per sample.
        batch_size: sequences per forward (``fisher``: always one sequence per backward).
        device: ``cpu`` or ``cuda``.
        seed: seed of Fisher's sampled labels.
        allow_pickle: allow pytorch_model.bin weights (weights-only load).
    """
    if kind not in STATS_KINDS:
        raise MergeConfigError(f"unknown statistics kind {kind!r}; use one of {', '.join(STATS_KINDS)}")
    data = Path(data)
    texts = read_texts(data, max_samples)
    lm, tokenizer = load_causal_lm(str(model), device=device, allow_pickle=allow_pickle)
    info = {"model": str(model), "data": str(data), "data_sha256": data_digest(data), "samples": len(texts),
            "max_samples": max_samples, "max_length": max_length}
    if kind == "fisher":
        fishers, tokens, aliases = _fisher(lm, texts, tokenizer, max_length, device, seed)
        return write_stats(out, fishers, kind, tokens={k: tokens for k in fishers}, aliases=aliases,
                           info=info | {"seed": seed})
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(key: str, x: torch.Tensor) -> None:
        if kind == "gram":
            sums[key] = sums.get(key, 0) + x.T @ x  # (in, in), fp32
        else:
            sums[key] = sums.get(key, 0) + x.to(torch.float64).square().sum(dim=0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    aliases = _linear_inputs(lm, texts, tokenizer, batch_size, max_length, device, accumulate)
    if kind == "act":  # Scale-SVD reads one statistic per weight name: no aliases
        sums |= {k: sums[v] for k, v in aliases.items()}
        counts |= {k: counts[v] for k, v in aliases.items()}
        aliases = {}
    means = {key: sums[key] / max(counts[key], 1) for key in sums}
    return write_stats(out, means, kind, tokens=counts, aliases=aliases, info=info)


def collect_activation_stats(model_dir: str | Path, data: str | Path, out: str | Path, **options) -> Path:
    """``collect_stats(..., kind="act")``: Scale-SVD's per-feature mean of x^2."""
    return collect_stats(model_dir, data, out, kind="act", **options)
