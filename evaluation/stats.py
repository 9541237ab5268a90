"""Activation statistics for data-aware methods (Scale-SVD): run the base model over a local
text or JSONL file and record, for every linear layer, the mean of x_j^2 of its input
features (OATS's second moment, squared). Saved as safetensors keyed by the layer's weight
name, so the merge engine hands each matrix its own statistics."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from merging.errors import MergeConfigError
from merging.io.checkpoint import CheckpointReader
from merging.io.writer import atomic_write

__all__ = ["collect_activation_stats", "read_texts"]


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


def collect_activation_stats(model_dir: str | Path, data: str | Path, out: str | Path, *, max_samples: int = 256,
                             max_length: int = 256, device: str = "cpu", allow_pickle: bool = False) -> Path:
    """Write ``out`` (safetensors): ``<linear>.weight`` -> mean over tokens of x^2, shape (d_in,).
    The model's weights are checked first (safetensors only unless ``allow_pickle``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    CheckpointReader(model_dir, name=str(model_dir), allow_pickle=allow_pickle).close()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=not allow_pickle,
                                                 trust_remote_code=False).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, inputs, output, key=f"{name}.weight"):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
                sums[key] = sums.get(key, 0) + x.square().sum(dim=0)
                counts[key] = counts.get(key, 0) + x.shape[0]
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for text in read_texts(Path(data), max_samples):
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                model(**{k: v.to(device) for k, v in ids.items()})
    finally:
        for h in hooks:
            h.remove()
    stats = {key: (sums[key] / counts[key]).to(torch.float32).cpu().contiguous() for key in sums}
    return atomic_write(out, lambda tmp: save_file(stats, str(tmp), metadata={"format": "pt"}))
